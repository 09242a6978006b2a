"""The appliance under pressure (issue 11, items 3 and 4, and restart reasons), end to end.

One appliance for the module, brought up by two `appliance up` racing each other: exactly one
supervisor must come out of it. Then a 24 MB prompt through inference.local must neither restart
the backend nor fail a small request sent alongside; a killed service's restart is logged with its
reason and kept in `appliance status`; and `down` (last) must leave nothing running or listening.
Real processes throughout: the CLI, the supervisor, the embedded model server and the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.up_env import environment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APPLIANCE = str(Path(sys.executable).parent / "appliance")
HUGE = "hello world, the quick brown fox. " * (24 * 2**20 // 34)  # ~24 MB, under the 32 MB cap


def cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def processes_of(state: Path) -> dict[int, str]:
    """Every live process whose command line names this state dir (not zombies), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        line = " ".join(a.decode(errors="replace") for a in argv if a)
        if str(state) in line:
            found[int(entry.name)] = line
    return found


def supervisors(state: Path) -> list[int]:
    return sorted(pid for pid, line in processes_of(state).items() if " serve all" in line)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def services(env: dict[str, str]) -> dict:
    return json.loads((Path(env["APPLIANCE_STATE_DIR"]) / "run" / "services.json").read_text())


def status(env: dict[str, str]) -> dict:
    out = cli(env, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def appliance(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    env = environment(tmp_path_factory.mktemp("appliance"), request.config)
    state = Path(env["APPLIANCE_STATE_DIR"])
    argv = [APPLIANCE, "up", "--timeout", "300"]
    racers = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    ups = [(p.wait(timeout=360), *p.communicate()) for p in racers]
    try:
        yield {"env": env, "state": state, "ups": ups}
    finally:
        cli(env, "down")
        for pid in processes_of(state):  # never leak a server into the rest of the suite
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_two_concurrent_ups_leave_exactly_one_supervisor(appliance: dict) -> None:
    env, state = appliance["env"], appliance["state"]
    codes = [code for code, _, _ in appliance["ups"]]
    assert codes == [0, 0], appliance["ups"]
    outs = [out for _, out, _ in appliance["ups"]]
    # One found it up; the other ran its steps (the serve step's line first) and started it.
    already = [o for o in outs if o.startswith("already up")]
    started = [o for o in outs if any(line.startswith("up in ") for line in o.splitlines())]
    assert len(already) == 1 and len(started) == 1, outs
    time.sleep(3)  # a second supervisor would be crash-looping on the ports by now
    (pid,) = supervisors(state)
    assert services(env)["supervisor_pid"] == pid
    pid_file = (state / "run" / "supervisor.pid").read_text().split()
    assert int(pid_file[0]) == pid
    for name in ("backend", "gateway"):
        child = services(env)[name]["pid"]
        ppid = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == pid, f"{name} (pid {child}) is not the supervisor's child"
    assert status(env)["inference"]["state"] == "ready"


def test_a_24mb_prompt_through_the_gateway_leaves_the_backend_and_others_alone(
    appliance: dict,
) -> None:
    env = appliance["env"]
    secret = json.loads(cli(env, "keys", "create", "big", "--json").stdout)["secret"]
    base = f"http://127.0.0.1:{env['APPLIANCE_GATEWAY__PORT']}/v1"
    before = services(env)["backend"]
    big: dict = {}

    def send_huge() -> None:
        body = {"model": "nemotron", "messages": [{"role": "user", "content": HUGE}]}
        r = httpx.post(
            f"{base}/chat/completions",
            json={**body, "max_tokens": 2},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=120,
        )
        big.update(status=r.status_code, body=r.json())

    huge = threading.Thread(target=send_huge, daemon=True)
    huge.start()
    time.sleep(0.5)  # the huge body is on its way in
    client = openai.OpenAI(base_url=base, api_key=secret, max_retries=0, timeout=30)
    started = time.monotonic()
    small = client.chat.completions.create(
        model="nemotron", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert small.usage.completion_tokens >= 1 and time.monotonic() - started < 20
    huge.join(120)
    assert big["status"] == 400 and big["body"]["error"]["message"], big  # the gateway's or vLLM's
    time.sleep(8)  # longer than the supervisor's 3 health checks 2 s apart
    after = services(env)["backend"]
    assert after["pid"] == before["pid"] and after["state"] == "ready", after
    inference = status(env)["inference"]
    assert inference["restarts"] == [], inference


def test_a_restart_is_logged_with_its_reason_and_kept_in_status(appliance: dict) -> None:
    env, state = appliance["env"], appliance["state"]
    first = services(env)["gateway"]["pid"]
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: (
            services(env)["gateway"]["state"] == "ready"
            and services(env)["gateway"]["pid"] != first
        ),
        60,
        "the gateway to come back",
    )
    report = status(env)
    (restart,) = report["gateway"]["restarts"]
    assert restart["reason"] == "exited with code -9" and restart["at"] > time.time() - 120
    human = cli(env, "status").stdout
    assert "exited with code -9" in human and "restart" in human, human
    log = (state / "logs" / "supervisor.log").read_text()
    assert "gateway: restart #1: exited with code -9" in log, log[-2000:]


def test_down_leaves_nothing_running_or_listening(appliance: dict) -> None:
    """Runs last: it takes the appliance down."""
    env, state = appliance["env"], appliance["state"]
    down = cli(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert processes_of(state) == {}
    for port in (env["APPLIANCE_GATEWAY__PORT"], env["APPLIANCE_INFERENCE__BACKEND_LISTEN__PORT"]):
        assert not answers(int(port)), f"port {port} still answers"
    assert not (state / "run" / "supervisor.pid").exists()
