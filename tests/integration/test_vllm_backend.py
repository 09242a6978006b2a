"""The vLLM backend against the stand-in server (tests/fakes/fake_vllm.py) as a real process.

The stand-in takes vLLM's argv and speaks its HTTP contract and metric names; env knobs make it
load slowly, run out of memory at start, or die. Every test checks that nothing is left running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hardware.plan_types import PlanOverrides, ServingPlan
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.backends import (
    BackendStartError,
    BackendTimeout,
    Backoff,
    ProcessBackend,
    UpstreamBackend,
    VllmBackend,
)
from inference.backends.vllm import flag_value
from tests.helpers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOSTS_DIR = REPO / "tests" / "fixtures" / "hosts"
FAKE = [sys.executable, "-m", "tests.fakes.fake_vllm"]


def spark_plan(overrides: PlanOverrides | None = None) -> ServingPlan:
    host = HostSnapshot.model_validate_json((HOSTS_DIR / "dgx_spark_gb10.json").read_text())
    return plan_serving(host, overrides, port=free_port())


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def make_backend(tmp_path: Path) -> Iterator[Callable[..., VllmBackend]]:
    made: list[VllmBackend] = []

    def make(plan: ServingPlan | None = None, **env: str) -> VllmBackend:
        b = VllmBackend(
            plan or spark_plan(),
            log_path=tmp_path / f"vllm-{len(made)}.log",
            executable=FAKE,
            extra_env={"PYTHONPATH": str(REPO), **env},
        )
        made.append(b)
        return b

    yield make
    for b in made:
        pgid = b.pid
        b.stop(grace=2.0)
        if pgid is not None:
            assert group_members(pgid) == [], "a backend process outlived stop()"


def test_start_wait_ready_with_progress_then_models_and_metrics(make_backend) -> None:
    b = make_backend(FAKE_VLLM_LOAD_SECONDS="1.5")
    calls: list[tuple[float, str]] = []
    t0 = time.monotonic()
    b.launch(timeout=30, progress=lambda elapsed, line: calls.append((elapsed, line)))
    assert time.monotonic() - t0 >= 1.5
    assert len(calls) >= 3, calls  # called while the model "loads"
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    # vLLM's weight-loading bar as the status shows it (tests/unit/test_backend_container.py)
    assert any(line == "loading weights 50% (2/4 shards)" for _, line in calls), calls
    assert b.health()

    models = b.models()
    assert [m["id"] for m in models] == ["nemotron"]
    assert models[0]["root"] == b.plan.model and models[0]["owned_by"] == "vllm"
    assert models[0]["max_model_len"] == b.plan.max_model_len

    # Ready means warmed up: one completion of one token ("Hello": one prompt token) answered.
    warm = b.metrics()
    assert (warm.prompt_tokens, warm.generation_tokens, warm.requests_finished) == (1, 1, 1)
    body = {"model": "nemotron", "messages": [{"role": "user", "content": "one two three"}]}
    answer = httpx.post(f"{b.api_base}/chat/completions", json={**body, "max_tokens": 5}).json()
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    m = b.metrics()
    assert (m.prompt_tokens, m.generation_tokens, m.requests_finished) == (1 + 3, 1 + 5, 2)
    assert m.finished_reasons == {"stop": 0, "length": 2, "abort": 0}
    assert m.requests_running == 0 and m.kv_cache_usage == 0
    assert m.ttft_count == 2 and m.ttft_mean is not None

    pid = b.pid
    assert pid is not None
    b.stop()
    assert b.returncode is not None and not b.running
    assert group_members(pid) == []
    assert not b.health()


def test_supervise_restarts_after_kill_9(make_backend) -> None:
    b = make_backend(FAKE_VLLM_LOAD_SECONDS="0.3")
    seen: list[tuple[str, str]] = []
    sup = b.supervise(
        on_state=lambda state, why: seen.append((state, why)),
        check_interval=0.1,
        backoff=Backoff(initial=0.2),
    )
    states = lambda: [state for state, _ in seen]  # noqa: E731
    try:
        assert sup.wait_for("ready", timeout=30)
        first = b.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: states().count("ready") == 2, timeout=30)
        assert b.pid != first and b.health()
        assert states() == ["starting", "ready", "restarting", "starting", "ready"]
        assert seen[2][1] == "exited with code -9; restart in 0.2 s"
        assert sup.restarts == 1 and group_members(first) == []
    finally:
        sup.stop(timeout=30)
    assert sup.state == "stopped" and states()[-1] == "stopped"
    assert b.pid is not None and group_members(b.pid) == []


def test_supervise_restarts_a_dead_engine(make_backend) -> None:
    """vLLM answers /health 503 once its engine is dead: that is a restart too."""
    b = make_backend()
    details: list[tuple[str, str]] = []
    sup = b.supervise(
        on_state=lambda s, why: details.append((s, why)),
        check_interval=0.1,
        unhealthy_after=2,
        backoff=Backoff(initial=0.1),
    )
    try:
        assert sup.wait_for("ready", timeout=30)
        first = b.pid
        assert first is not None
        os.kill(first, signal.SIGUSR1)  # the stand-in's "engine dead"
        wait_until(lambda: [s for s, _ in details].count("ready") == 2, timeout=30)
        assert any(s == "restarting" and "unhealthy" in why for s, why in details)
        assert b.pid != first and group_members(first) == []
    finally:
        sup.stop(timeout=30)


def test_oom_at_start_steps_utilisation_down(make_backend) -> None:
    plan = spark_plan(PlanOverrides(gpu_memory_utilization=0.92))
    b = make_backend(plan, FAKE_VLLM_OOM_ABOVE="0.85")
    b.launch(timeout=30)
    assert b.health()
    assert flag_value(b.argv, "--gpu-memory-utilization") == "0.82"
    assert b.plan.gpu_memory_utilization == 0.82 <= 0.85
    assert b.plan.max_model_len == plan.max_model_len
    assert [r.value for r in b.step_downs] == ["0.87", "0.82"]
    assert b.plan.reasons[-1].setting == "--gpu-memory-utilization"
    assert "Free memory on device" in b.plan.reasons[-1].why
    assert b.starts == 3


def test_context_oom_steps_max_model_len_down(make_backend) -> None:
    b = make_backend(FAKE_VLLM_OOM_MAX_LEN="70000")
    b.launch(timeout=30)
    assert b.health()
    assert b.plan.max_model_len == 65536 and b.models()[0]["max_model_len"] == 65536
    assert b.plan.gpu_memory_utilization == 0.80  # lowering it cannot help this error
    assert [r.setting for r in b.step_downs] == ["--max-model-len"]


def test_oom_that_never_clears_gives_a_clear_error(make_backend) -> None:
    b = make_backend(FAKE_VLLM_OOM_ABOVE="0.5", FAKE_VLLM_OOM_KIND="cuda")
    with pytest.raises(BackendStartError) as caught:
        b.launch(timeout=30)
    err = caught.value
    assert not err.retryable and err.returncode == 1
    assert "out of memory at start even at --gpu-memory-utilization 0.70" in str(err)
    assert "--max-model-len 32768" in str(err)
    assert [r.value for r in b.step_downs] == ["0.75", "0.70", "131072", "65536", "32768"]
    assert b.starts == 6 and not b.running


def test_supervisor_reports_failed_when_oom_never_clears(make_backend) -> None:
    b = make_backend(FAKE_VLLM_OOM_ABOVE="0.1", FAKE_VLLM_OOM_KIND="cache-blocks")
    states: list[str] = []
    sup = b.supervise(on_state=lambda s, why: states.append(s), backoff=Backoff(initial=0.1))
    assert sup.wait_for("failed", timeout=60)
    sup.stop(timeout=10)
    assert states == ["starting", "failed"] and not b.running


def test_start_failure_that_is_not_oom_is_raised_as_is(tmp_path: Path) -> None:
    script = (
        "import sys; print('OSError: nvidia/foo is not a valid model', flush=True); sys.exit(3)"
    )
    b = ProcessBackend(
        [sys.executable, "-c", script],
        base_url=f"http://127.0.0.1:{free_port()}",
        log_path=tmp_path / "p.log",
    )
    with pytest.raises(BackendStartError) as caught:
        b.launch(timeout=10)
    assert caught.value.returncode == 3 and caught.value.retryable
    assert "not a valid model" in str(caught.value)


def test_wait_ready_times_out_and_stop_cleans_up(make_backend) -> None:
    b = make_backend(FAKE_VLLM_LOAD_SECONDS="60")
    with pytest.raises(BackendTimeout, match="not healthy after 1 s"):
        b.launch(timeout=1.0)
    assert not b.running


def test_cancel_interrupts_a_start(make_backend) -> None:
    b = make_backend(FAKE_VLLM_LOAD_SECONDS="60")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(Exception, match="cancelled"):
        b.launch(timeout=60, cancel=cancel)
    assert time.monotonic() - t0 < 10 and not b.running


def test_refuses_a_port_already_in_use(make_backend) -> None:
    plan = spark_plan()
    first, second = make_backend(plan), make_backend(plan)
    first.launch(timeout=30)
    with pytest.raises(BackendStartError, match="already in use"):
        second.start()


def test_stop_kills_the_whole_group_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('up', flush=True); time.sleep(120)"
    )
    b = ProcessBackend(
        [sys.executable, "-c", script],
        base_url=f"http://127.0.0.1:{free_port()}",
        log_path=tmp_path / "p.log",
    )
    b.start()
    pid = b.pid
    assert pid is not None
    wait_until(lambda: len(group_members(pid)) == 2)  # the leader and its child
    t0 = time.monotonic()
    b.stop(grace=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert b.returncode == -signal.SIGKILL
    wait_until(lambda: group_members(pid) == [], timeout=5)


def test_api_key_guards_v1_and_never_shows_in_ps(tmp_path: Path) -> None:
    b = VllmBackend(
        spark_plan(),
        log_path=tmp_path / "vllm.log",
        executable=FAKE,
        api_key="sk-local-secret",
        extra_env={"PYTHONPATH": str(REPO)},
    )
    try:
        b.launch(timeout=30)
        assert b.pid is not None
        cmdline = Path(f"/proc/{b.pid}/cmdline").read_bytes()
        assert b"sk-local-secret" not in cmdline
        assert b"sk-local-secret" not in (tmp_path / "vllm.log").read_bytes()
        assert b.models()[0]["id"] == "nemotron"  # auth_headers() carries the key
        assert httpx.get(f"{b.api_base}/models").status_code == 401

        # The same server seen as an upstream: healthy only with the right key.
        assert UpstreamBackend(b.api_base, api_key="sk-local-secret").health()
        assert not UpstreamBackend(b.api_base, api_key="wrong").health()
        # The warm-up went through with the key: its one prompt token is counted.
        assert UpstreamBackend(b.api_base, api_key="sk-local-secret").scrape().prompt_tokens == 1
    finally:
        b.stop()


def test_ready_only_after_the_warm_up_answered(make_backend) -> None:
    """The first request is slow (vLLM compiles on it): `ready` waits for it, and the progress
    says so while /health is already 200."""
    b = make_backend(FAKE_VLLM_TOKEN_DELAY="1.0")
    calls: list[tuple[float, str]] = []
    b.launch(timeout=30, progress=lambda elapsed, line: calls.append((elapsed, line)))
    warming = [e for e, line in calls if line.startswith("warming up")]
    assert warming and max(warming) >= 0.75, calls  # reported all through the slow request
    assert b.metrics().requests_finished == 1


def test_a_refused_warm_up_fails_the_start_for_good(tmp_path: Path) -> None:
    """A warm-up the backend refuses with a 4xx (here: a model it does not serve) cannot succeed
    on a retry: not retryable, and nothing left running."""
    b = ProcessBackend(
        [*FAKE, "serve", "m", "--port", str(port := free_port())],
        base_url=f"http://127.0.0.1:{port}",
        log_path=tmp_path / "fake.log",
        env={"PYTHONPATH": str(REPO)},
        warmup_model="not-served",
    )
    with pytest.raises(BackendStartError, match="warm-up request refused: HTTP 404") as caught:
        b.launch(timeout=30)
    assert not caught.value.retryable and not b.running


def test_offline_needs_the_model_in_the_cache(tmp_path: Path) -> None:
    plan = spark_plan()
    hf_home = tmp_path / "hf"
    b = VllmBackend(
        plan,
        log_path=tmp_path / "vllm.log",
        executable=FAKE,
        offline=True,
        hf_home=hf_home,
        extra_env={"PYTHONPATH": str(REPO)},
    )
    with pytest.raises(BackendStartError, match="not in the Hugging Face cache") as caught:
        b.start()
    assert not caught.value.retryable and b.pid is None
    snapshot = hf_home / "hub" / f"models--{plan.model.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    try:
        b.launch(timeout=30)
        assert b.health()
    finally:
        b.stop()
