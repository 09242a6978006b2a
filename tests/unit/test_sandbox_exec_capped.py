"""`sandbox exec` output is capped (sandbox/lifecycle/exec.py run_capped): a command that writes
without end (`yes`) is stopped at the cap and the answer says truncated; what it keeps is exactly
the cap, so the control plane's memory stays bounded. Real processes, no Podman needed."""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import time

from sandbox.lifecycle.exec import EXEC_MARK, run_capped, stop_marked

CAP = 1 << 20


def test_an_endless_writer_is_stopped_at_the_cap_and_flagged() -> None:
    started = time.monotonic()
    done = run_capped(["yes"], b"", CAP, timeout=30)
    assert time.monotonic() - started < 10
    assert done.truncated and not done.timed_out
    assert len(done.stdout) == CAP and done.stdout.startswith(b"y\ny\n")
    assert done.exit_code != 0  # stopped, not ended by itself


def test_an_endless_writer_on_stderr_is_stopped_too() -> None:
    done = run_capped(["sh", "-c", "yes >&2"], b"", CAP, timeout=30)
    assert done.truncated and len(done.stderr) == CAP and done.stdout == b""


def test_memory_stays_bounded_with_a_large_cap() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    done = run_capped(["sh", "-c", "yes | head -c 200000000"], b"", 8 << 20, timeout=60)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert done.truncated and len(done.stdout) == 8 << 20
    assert grown_mib < 64, f"grew {grown_mib:.0f} MiB for 8 MiB kept of 200 MB written"


def test_output_under_the_cap_is_whole_and_stdin_is_fed() -> None:
    done = run_capped(["sh", "-c", "cat; echo err >&2; exit 3"], b"hello\n" * 1000, CAP, 30)
    assert done == done.__class__(3, b"hello\n" * 1000, b"err\n", False, False)


def test_exactly_the_cap_is_not_truncated() -> None:
    done = run_capped(["head", "-c", str(CAP), "/dev/zero"], b"", CAP, timeout=30)
    assert not done.truncated and len(done.stdout) == CAP and done.exit_code == 0


def test_a_command_past_its_timeout_is_stopped() -> None:
    started = time.monotonic()
    done = run_capped(["sleep", "30"], b"", CAP, timeout=0.5)
    assert done.timed_out and time.monotonic() - started < 5


def test_stop_marked_kills_the_marked_command_and_its_children_only() -> None:
    """Stopping the Podman client leaves the exec session running in the container: the
    command and what it forked are found by the mark in their environment and killed."""
    mark = secrets.token_hex(8)
    env = {**os.environ, EXEC_MARK: mark}
    marked = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"], env=env)
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, EXEC_MARK: "another"})
    try:
        time.sleep(0.3)  # the child sleep is forked
        assert stop_marked(mark) >= 3  # sh and its two sleeps
        assert marked.wait(5) == -signal.SIGKILL
        assert other.poll() is None  # another exec's command is left alone
        assert stop_marked(mark) == 0
    finally:
        other.kill()
        other.wait()
