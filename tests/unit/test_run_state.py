"""One supervisor per state dir, one `up`/`down` at a time, pid files only removed by their
writer (issue 11, item 4). Real locks (flock) and real processes; see also
tests/e2e/test_appliance_pressure.py for two racing `appliance up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import BackendError
from appliance.services import run_state
from appliance.services.supervisor import pid_file, run_dir, running_supervisor, supervisor_pid

HOLD = """
import sys, time
from pathlib import Path
from appliance.services import run_state
run = Path(sys.argv[1])
run_state.hold_supervisor_lock(run)
run_state.write_pid_file(run / "supervisor.pid", "inst-1")
print("held", flush=True)
time.sleep(60)
"""


def holder(run: Path) -> subprocess.Popen[str]:
    """Another process holding the supervisor lock and its pid file, as a supervisor does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_supervisor_for_the_same_state_dir_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_state, "LOCK_WAIT_S", 0.3)
    proc = holder(tmp_path)
    try:
        with pytest.raises(run_state.AlreadySupervised, match=rf"\(pid {proc.pid}\)"):
            run_state.hold_supervisor_lock(tmp_path)
        assert run_state.supervisor_lock_held(tmp_path) is True
    finally:
        proc.kill()
        proc.wait()
    assert run_state.supervisor_lock_held(tmp_path) is False  # released with its process
    os.close(run_state.hold_supervisor_lock(tmp_path))


def test_supervisor_pid_is_the_lock_holders_and_a_stale_file_is_ignored() -> None:
    config = load_config()
    run_dir(config).mkdir(parents=True)
    proc = holder(run_dir(config))
    try:
        assert supervisor_pid(config) == proc.pid
        assert running_supervisor(config) == (proc.pid, "inst-1")
    finally:
        proc.kill()
        proc.wait()
    # The pid file names a live process (ours) but nothing holds the lock: stale, not "up".
    run_state.write_pid_file(pid_file(config), "inst-2")
    assert supervisor_pid(config) is None and running_supervisor(config) is None


def test_the_pid_file_is_removed_only_by_its_writer(tmp_path: Path) -> None:
    pids, services = tmp_path / "supervisor.pid", tmp_path / "services.json"
    pids.write_text("1 someone-else\n")
    services.write_text(json.dumps({"supervisor_pid": 1}))
    run_state.remove_if_mine(pids, services)  # a loser's clean-up
    assert pids.read_text() == "1 someone-else\n" and services.exists()
    run_state.write_pid_file(pids, "mine")
    services.write_text(json.dumps({"supervisor_pid": os.getpid()}))
    assert run_state.read_pid_file(pids) == (os.getpid(), "mine")
    run_state.remove_if_mine(pids, services)
    assert not pids.exists() and not services.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_up_and_down_wait_for_each_other(tmp_path: Path) -> None:
    order: list[str] = []
    entered = threading.Event()

    def first() -> None:
        with run_state.lifecycle_lock(tmp_path, timeout=5):
            entered.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(5)
    waits: list[str] = []
    with run_state.lifecycle_lock(tmp_path, timeout=5, on_wait=waits.append):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert waits == [f"waiting for another `appliance up` or `down` (pid {os.getpid()})"]


def test_waiting_for_the_lifecycle_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    with (
        run_state.lifecycle_lock(tmp_path, timeout=1),
        pytest.raises(BackendError, match="another `appliance up` or `down` is still") as err,
        run_state.lifecycle_lock(tmp_path, timeout=0.3),
    ):
        pass
    assert err.value.hint and "--timeout" in err.value.hint


def test_a_holder_that_has_not_written_its_pid_yet_is_waited_for(tmp_path: Path) -> None:
    """Between taking the lock and writing its pid the file is empty: a second `up` waiting
    then must say so without the pid, not fail (IndexError, seen with two racing `up`s)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / "lifecycle.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # taken, nothing written
    said: list[str] = []

    def release() -> None:
        time.sleep(0.5)
        os.close(fd)

    threading.Thread(target=release).start()
    with run_state.lifecycle_lock(run, 10, on_wait=said.append):
        pass
    assert said == ["waiting for another `appliance up` or `down`"]
