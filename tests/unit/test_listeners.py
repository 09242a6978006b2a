"""`up` checks that what listens on the gateway's and backend's ports is the supervisor's own
child (issue 11, item 4): appliance.services.listeners reads that from /proc, checked with real
sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from appliance.services.listeners import served_by

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")


def test_a_port_is_served_by_the_process_that_listens() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert served_by(port, os.getpid()) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert served_by(port, other.pid) is False  # someone else's server on that port
        finally:
            other.kill()
            other.wait()


def test_a_port_nobody_listens_on_is_served_by_nobody() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        assert served_by(port, os.getpid()) is False


def test_a_child_in_the_process_group_counts() -> None:
    """vLLM's API server may hold the socket in a forked worker of the leader's group."""
    code = (
        "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1);"
        "print(s.getsockname()[1], flush=True); time.sleep(30)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable,"
         f" '-c', {code!r}]).wait()"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert leader.stdout is not None
        port = int(leader.stdout.readline())
        assert served_by(port, leader.pid) is True
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()
