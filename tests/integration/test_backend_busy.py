"""One huge prompt must not take the embedded server away from everyone else (issue 11, item 3).

A 24 MB prompt (under the gateway's 32 MB body cap) used to be tokenized on the server's event
loop: /health stopped answering for half a minute, so the supervisor restarted the backend and
every stream in flight was cut. Now a prompt that cannot fit the context is refused at once with
vLLM's 400 (a proven lower bound on its token count, no tokenizing), and whatever is tokenized is
tokenized on a worker thread while /health and other requests carry on.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from inference.embedded import weights  # noqa: E402
from tests.embedded_fixtures import MODEL, start_server, stop_server  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HUGE = ("hello world, the quick brown fox. " * (24 * 2**20 // 34 + 1))[: 24 * 2**20]  # 24 MiB
PARTS = [{"type": "text"}] * 500_000
CONTEXT = re.compile(r"This model's maximum context length is (\d+) tokens\. However, you")


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    try:
        weights.default_gguf()
    except weights.ModelNotFound as exc:
        pytest.skip(str(exc))
    cache = getattr(request.config, "cache", None)  # converted weights shared with other tests
    cache = cache.mkdir("embedded-models") if cache else tmp_path_factory.mktemp("models")
    proc, url = start_server(cache, tmp_path_factory.mktemp("busy") / "server.log")
    yield url
    stop_server(proc)


class HealthWatch:
    """Polls /health every 0.2 s on its own thread; records each answer's status and latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[int | str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status: int | str = client.get(f"{self.url}/health").status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.samples.append((status, time.monotonic() - start))
                self._stop.wait(0.2)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def post_in_thread(url: str, body: dict, out: dict) -> threading.Thread:
    def run() -> None:
        start = time.monotonic()
        try:
            r = httpx.post(url, json=body, timeout=120)
            out.update(status=r.status_code, body=r.json())
        except httpx.HTTPError as exc:
            out.update(status=type(exc).__name__, body=None)
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_context_400(result: dict) -> str:
    assert result["status"] == 400, result
    err = result["body"]["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] is None
    assert CONTEXT.search(err["message"]), err["message"]
    return err["message"]


def test_a_24mb_prompt_is_refused_at_once_while_health_and_a_small_request_carry_on(
    server: str,
) -> None:
    big: dict = {}
    small: dict = {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": HUGE}], "max_tokens": 2}
    with HealthWatch(server) as health:
        huge = post_in_thread(f"{server}/v1/chat/completions", body, big)
        time.sleep(0.3)  # the huge body is on its way in
        short = post_in_thread(
            f"{server}/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            small,
        )
        huge.join(120)
        short.join(120)
        time.sleep(1.0)  # and health keeps answering afterwards
    message = assert_context_400(big)
    assert "at least" in message  # refused from the bound: 24 MB was never tokenized
    assert big["elapsed"] < 10, big["elapsed"]
    assert small["status"] == 200, small
    assert small["body"]["usage"]["completion_tokens"] >= 1
    assert small["elapsed"] < 15, small["elapsed"]
    assert len(health.samples) >= 5
    slow = [(s, round(t, 2)) for s, t in health.samples if s != 200 or t > 1.0]
    assert not slow, f"/health stalled or failed: {slow} of {len(health.samples)}"


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize"])
def test_a_24mb_prompt_on_the_other_text_routes_is_400_at_once(server: str, route: str) -> None:
    out: dict = {}
    post_in_thread(f"{server}{route}", {"model": MODEL, "prompt": HUGE, "max_tokens": 2}, out).join(
        120
    )
    assert "at least" in assert_context_400(out)
    assert out["elapsed"] < 10, out["elapsed"]


def test_a_prompt_under_the_bound_yet_over_the_context_gets_the_exact_count(server: str) -> None:
    """~600 KB: too few bytes for the bound to prove it too long, so it is tokenized (off the
    loop) and refused with the exact count, as vLLM words it."""
    text = "alpha beta gamma delta " * 26_000
    out: dict = {}
    with HealthWatch(server) as health:
        post_in_thread(
            f"{server}/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 2}, out
        ).join(120)
    message = assert_context_400(out)
    count = re.search(r"requested \d+ tokens \((\d+) in the messages, 2 in the completion", message)
    assert count and int(count.group(1)) > int(CONTEXT.search(message).group(1)), message
    assert all(s == 200 and t < 1.0 for s, t in health.samples), health.samples


@pytest.mark.parametrize(
    "route, body",
    [
        # A union of prompt shapes tried on every item: millions of errors, minutes on the loop.
        ("/v1/completions", {"prompt": [1.5] * (4 * 2**20), "max_tokens": 2}),
        ("/v1/completions", {"prompt": [[1, 2]] + [1] * (8 * 2**20), "max_tokens": 2}),
        # Hundreds of thousands of tiny messages, each a model to validate.
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 700_000}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PARTS}]}),
    ],
    ids=["floats", "mixed-ids", "messages", "content-parts"],
)
def test_a_huge_body_of_the_wrong_shape_is_400_at_once(server: str, route: str, body: dict) -> None:
    out: dict = {}
    with HealthWatch(server) as health:
        post_in_thread(f"{server}{route}", {"model": MODEL, **body}, out).join(300)
    assert out["status"] == 400 and out["body"]["error"]["type"] == "BadRequestError", out
    assert out["elapsed"] < 5, out["elapsed"]
    assert all(s == 200 and t < 1.0 for s, t in health.samples), health.samples


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/completions", {"prompt": "a", "stop": [1] * (4 * 2**20)}),
        ("/v1/completions", {"prompt": "a", "stop_token_ids": [1.5] * (4 * 2**20)}),
        ("/detokenize", {"tokens": [1.5] * (4 * 2**20)}),
    ],
    ids=["stop", "stop-token-ids", "detokenize"],
)
def test_a_huge_list_in_any_field_is_400_at_once(server: str, route: str, body: dict) -> None:
    out: dict = {}
    post_in_thread(f"{server}{route}", {"model": MODEL, **body}, out).join(300)
    assert out["status"] == 400 and out["body"]["error"]["type"] == "BadRequestError", out
    assert out["elapsed"] < 5, out["elapsed"]
