"""`appliance up`'s wait: progress as lines where no spinner shows (a pipe), and the
supervisor's verdict instead of a deadline the size of one model load."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.bringup.wait import ProgressLines, wait_for_verdict
from appliance.config import load_config
from appliance.errors import BackendError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def loading(detail: str, backend: str = "starting") -> dict[str, Any]:
    return {
        "instance": "i1",
        "control": {"state": "ready"},
        "gateway": {"state": "starting"},
        "backend": {"state": backend, "detail": detail},
    }


READY = {"instance": "i1", **{n: {"state": "ready"} for n in ("control", "gateway", "backend")}}


def test_progress_lines_show_changes_at_most_every_few_seconds_and_a_heartbeat() -> None:
    clock, said = FakeClock(), []
    show = ProgressLines(said.append, every=5.0, heartbeat=30.0, clock=clock)
    states = {"control": "ready", "gateway": "starting", "backend": "starting"}
    # The supervisor's detail changes every second (its elapsed prefix): not a change of line.
    for second in range(4):
        show(states, f"{second} s: loading weights 10% (2/20 shards)")
        clock.sleep(1)
    show(states, "4 s: loading weights 15% (3/20 shards)")  # changed, but 4 s after the last
    clock.sleep(1)
    show(states, "5 s: loading weights 15% (3/20 shards)")  # 5 s: the change shows now
    assert said == [
        "    0 s: backend starting: loading weights 10% (2/20 shards)",
        "    5 s: backend starting: loading weights 15% (3/20 shards)",
    ]
    for second in range(6, 36):  # no change for 30 s: one heartbeat with the elapsed time
        clock.sleep(1)
        show(states, f"{second} s: loading weights 15% (3/20 shards)")
    assert said[2:] == ["    35 s: backend starting: loading weights 15% (3/20 shards)"]


def _progressing(clock: FakeClock, ready_at: float) -> Any:
    """services.json of a backend that reports new progress every second until `ready_at`."""
    start = clock.now

    def read() -> dict[str, Any]:
        elapsed = clock.now - start
        if elapsed >= ready_at:
            return READY
        return loading(f"{elapsed:.0f} s: loading weights {int(elapsed) % 100}%")

    return read


def test_by_default_the_wait_outlasts_one_load_while_the_backend_reports_progress() -> None:
    """An OOM step-down reloads inside the same start: twice inference.ready_timeout_s of load
    is not a reason to give up while the backend moves."""
    clock = FakeClock()
    read = _progressing(clock, ready_at=250)
    name, services = wait_for_verdict(
        read,
        lambda: False,
        lambda *_: None,
        timeout=None,
        stall_s=100,
        clock=clock,
        sleep=clock.sleep,
    )
    assert name is None and services == READY


def test_an_explicit_timeout_is_a_hard_limit() -> None:
    clock = FakeClock()
    with pytest.raises(BackendError, match=r"not ready after 20 s") as caught:
        wait_for_verdict(
            _progressing(clock, ready_at=250),
            lambda: False,
            lambda *_: None,
            timeout=20,
            stall_s=100,
            clock=clock,
            sleep=clock.sleep,
        )
    assert "--timeout" in (caught.value.hint or "")


def test_a_supervisor_that_reports_nothing_new_is_given_up_on() -> None:
    clock = FakeClock()
    stuck = loading("12 s: loading weights 40%")
    with pytest.raises(BackendError, match=r"no service reported anything for 100 s"):
        wait_for_verdict(
            lambda: stuck,
            lambda: False,
            lambda *_: None,
            timeout=None,
            stall_s=100,
            clock=clock,
            sleep=clock.sleep,
        )
    assert 1100 < clock.now < 1102


def test_a_failed_service_is_the_verdict_at_once() -> None:
    clock = FakeClock()
    name, _ = wait_for_verdict(
        lambda: loading("OOM", backend="failed"),
        lambda: False,
        lambda *_: None,
        timeout=None,
        stall_s=100,
        clock=clock,
        sleep=clock.sleep,
    )
    assert name == "backend" and clock.now == 1000.0


def test_up_waits_for_the_verdict_by_default() -> None:
    from appliance.cli.lifecycle import up

    assert inspect.signature(up).parameters["timeout"].default is None


def test_up_piped_prints_the_load_progress_and_waits_past_ready_timeout(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stdout is no terminal here (captured, as under `| tee` or Ansible): the backend's progress
    comes as lines, and a load longer than inference.ready_timeout_s that keeps moving is
    waited for (timeout None: the supervisor's verdict)."""
    from appliance.cli.lifecycle import _wait_ready

    config = load_config({})
    config.inference.ready_timeout_s = 1.0
    run = config.state_dir / "run"
    run.mkdir(parents=True)
    services = run / "services.json"

    def write(data: dict[str, Any]) -> None:
        tmp = services.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(services)

    write(loading("1 s: loading weights 45% (9/20 shards)"))

    def supervisor() -> None:
        for n in range(10):  # 2.5 s of progress, a new line every 0.25 s
            time.sleep(0.25)
            write(loading(f"{n + 2} s: loading weights {50 + n}% (10/20 shards)"))
        write(READY)

    writer = threading.Thread(target=supervisor)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    writer.start()
    try:
        _wait_ready(config, proc, "i1", timeout=None)
    finally:
        writer.join()
        proc.kill()
        proc.wait()
    out = capsys.readouterr().out
    # The first read shows a line at once (which one depends on the writer's pace here).
    assert re.search(
        r"^    \d+ s: backend starting: loading weights \d+% \(\d+/20 shards\)$", out, re.M
    ), out


def test_a_backend_that_fails_to_start_is_one_line(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM out of memory at start (after its step-downs): the log's tail for context, then the
    backend's own detail as the one line (it says what to do)."""
    import json
    import subprocess

    from appliance.cli.lifecycle import _wait_ready
    from appliance.errors import BackendError

    config = load_config({})
    log = isolated_env / "backend.log"
    log.write_text("INFO loading\nERROR CUDA out of memory. Tried to allocate 2.00 GiB\n")
    oom = (
        "vLLM runs out of memory at start even at --gpu-memory-utilization 0.70 and "
        "--max-model-len 32768 (floors 0.70 and 32768): CUDA out of memory. Free GPU memory "
        "held by other processes, or plan a smaller model.\nTraceback ..."
    )
    run = config.state_dir / "run"
    run.mkdir(parents=True)
    services = {
        "instance": "i1",
        "control": {"state": "ready"},
        "gateway": {"state": "starting"},
        "backend": {"state": "failed", "detail": oom, "log": str(log)},
    }
    (run / "services.json").write_text(json.dumps(services))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(BackendError) as caught:
            _wait_ready(config, proc, "i1", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert str(caught.value) == f"backend failed to start: {oom.splitlines()[0]}"
    assert "\n" not in str(caught.value) and "above" in (caught.value.hint or "")
    assert "CUDA out of memory. Tried to allocate" in capsys.readouterr().err
