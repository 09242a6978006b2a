"""Benchmark: the web console's live refresh against the API, and how long a notification takes.

Real `appliance serve control` processes on temporary state dirs (no GPU, no backend, no
sandboxes: the status report is what this host gathers), all measured in one run:

(a) Polling. What the console's script re-fetches (GET /fragments/overview every 2 s,
    GET /fragments/approvals/pending every 1 s), each poller a logged-in session (its own cookie
    and keep-alive connection), against the same data through the API over the same loopback
    port (GET /api/v1/status, GET /api/v1/approvals with an operator's bearer token). Three load
    shapes: 1 poller back to back, 20 pollers back to back (each sends its next request when its
    last is answered: the worst case), and 20 pollers at the page's own interval (start times
    spread over one interval, as tabs opened at different moments are). Console and API run
    in alternating rounds, never at once. Latency p50/p95 and the ratio console / API.
(b) Notifications. `POST /api/v1/kill {"all": true}` with nothing to kill (a real decision: the
    kill switch appends `kill` and `control.kill` to the audit chain) on three planes side by
    side: no webhook, a webhook to a local receiver that answers at once, one to a receiver that
    sleeps 2 s before answering. Per kill: the decision's latency on each plane (interleaved),
    and on the fast plane the lag from the audit record's timestamp (and from the call's start)
    to the receiver holding the signed `agent.killed` webhook (signature checked).

    .venv/bin/python tests/bench/bench_console.py [--rounds 3] [--requests 30] [--events 20]
        [--interval-ticks 2] [--json out.json]

Not a test: run it by hand. About 1.5 minutes on a 2-core machine. The pollers are asyncio
tasks in this process, on the same cores as the server: their own cost is in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.control.notify.follower import POLL_EVERY_S
from appliance.control.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env, free_port
from tests.notify_fixtures import Receiver, receiver

SECRET_VAR = "BENCH_CONSOLE_WEBHOOK_SECRET"
SECRET = "bench-console-webhook-secret"
SLOW_RECEIVER_S = 2.0
POLLERS = 20
# A poller idle while the other side's rounds run drops its connection before uvicorn's 5 s
# keep-alive timeout would (reusing one the server is closing is a ReadError, not a latency).
LIMITS = httpx.Limits(keepalive_expiry=3.0)
# (console fragment, API route, the page's refresh interval) as the templates poll them
PAIRS = [
    ("Overview", "/fragments/overview", "/api/v1/status", 2.0),
    ("Approvals", "/fragments/approvals/pending", "/api/v1/approvals", 1.0),
]
# Each side's floor on the same TCP port (1 poller only): a static file, the API's schema; no
# status gathering, no store.
FLOOR = ("Floor", "/static/console.css", "/api/v1/openapi.json", 1.0)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def plane(root: Path, name: str, port: int | None = None, hook_url: str | None = None) -> Iterator:
    """A real control plane on <root>/<name>: (its state dir, its env)."""
    scratch = root / name
    scratch.mkdir()
    state = scratch / "state"
    settings = {"APPLIANCE_CONTROL__PORT": str(port)} if port else {}
    env = cli_env(state, scratch, **settings)
    if hook_url:  # cli_env points the system config layer here
        hook = {"name": "bench", "url": hook_url, "events": ["agent.killed"]}
        config = {"notify": {"webhooks": [{**hook, "secret_env": SECRET_VAR}]}}
        Path(env["APPLIANCE_SYSTEM_CONFIG"]).write_text(json.dumps(config))  # JSON is YAML
        env[SECRET_VAR] = SECRET
    with running_control_plane(env, state):
        yield state, env


def socket_client(state: Path) -> httpx.Client:
    """The plane's unix socket: the peer (root here) is an admin, as for the CLI."""
    transport = httpx.HTTPTransport(uds=str(control_socket(state)))
    return httpx.Client(transport=transport, base_url="http://control/api/v1", timeout=30)


# (a) polling ------------------------------------------------------------------------------


@dataclass
class Pollers:
    base: str
    token: str

    async def sessions(self, count: int, console: bool) -> list[httpx.AsyncClient]:
        clients = []
        for _ in range(count):
            if console:  # a browser: log in through the form, keep the session cookie
                client = httpx.AsyncClient(base_url=self.base, timeout=60, limits=LIMITS)
                form = await client.get("/login")  # its CSRF token: a hidden field and a cookie
                csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
                answer = await client.post("/login", data={"token": self.token, "csrf": csrf})
                assert answer.status_code == 303, answer.text[:300]
            else:  # a script: the operator's bearer token
                auth = {"Authorization": f"Bearer {self.token}"}
                client = httpx.AsyncClient(
                    base_url=self.base, timeout=60, headers=auth, limits=LIMITS
                )
            clients.append(client)
        return clients


async def _get(client: httpx.AsyncClient, path: str, into: list[float]) -> None:
    start = time.perf_counter()
    answer = await client.get(path)
    into.append(time.perf_counter() - start)
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"


async def back_to_back(clients: list[httpx.AsyncClient], path: str, each: int) -> list[float]:
    samples: list[float] = []

    async def poller(client: httpx.AsyncClient) -> None:
        for _ in range(each):
            await _get(client, path, samples)

    await asyncio.gather(*(poller(c) for c in clients))
    return samples


async def at_interval(
    clients: list[httpx.AsyncClient], path: str, every_s: float, ticks: int
) -> list[float]:
    """Each poller fetches every `every_s` (as console.js's setInterval; a fetch still in
    flight skips the tick), the pollers' first ticks spread evenly over one interval."""
    samples: list[float] = []

    async def poller(index: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(every_s * index / len(clients))
        next_at = time.perf_counter()
        for _ in range(ticks):
            await _get(client, path, samples)
            next_at += every_s
            while next_at < time.perf_counter():  # a tick missed while in flight
                next_at += every_s
            await asyncio.sleep(next_at - time.perf_counter())

    await asyncio.gather(*(poller(i, c) for i, c in enumerate(clients)))
    return samples


Shape = Callable[[list[httpx.AsyncClient], str, float], Awaitable[list[float]]]


async def polling(base: str, token: str, args: argparse.Namespace) -> dict[str, list[float]]:
    pollers = Pollers(base, token)
    console = await pollers.sessions(POLLERS, console=True)
    api = await pollers.sessions(POLLERS, console=False)
    shapes: dict[str, tuple[int, Shape]] = {
        "1 poller, back to back": (1, lambda c, p, _: back_to_back(c, p, args.requests)),
        f"{POLLERS} pollers, back to back": (
            POLLERS,
            lambda c, p, _: back_to_back(c, p, max(1, args.requests // 5)),
        ),
        f"{POLLERS} pollers, page interval": (
            POLLERS,
            lambda c, p, every: at_interval(c, p, every, args.interval_ticks),
        ),
    }
    results: dict[str, list[float]] = {}
    for _name, fragment, route, _every in PAIRS:  # warm both paths (templates, caches)
        await back_to_back(console[:1], fragment, 3)
        await back_to_back(api[:1], route, 3)
    for round_ in range(args.rounds):
        for shape, (count, run) in shapes.items():
            for name, fragment, route, every in PAIRS + ([FLOOR] if count == 1 else []):
                # alternate which goes first: neither always follows the other's load
                order = [("console", fragment, console), ("API", route, api)]
                for side, path, clients in order if round_ % 2 == 0 else order[::-1]:
                    key = f"{shape}|{name}|{side}|{path}"
                    results.setdefault(key, []).extend(await run(clients[:count], path, every))
    for client in console + api:
        await client.aclose()
    return results


def polling_table(results: dict[str, list[float]]) -> list[str]:
    lines = [
        f"{'load':30} {'page':10} {'via':8} {'path':30} {'n':>4} {'p50 ms':>8} {'p95 ms':>8}"
        f" {'p50 ratio':>9} {'p95 ratio':>9}"
    ]
    keys = list(results)
    for key in keys:
        shape, name, side, path = key.split("|")
        samples = results[key]
        p50, p95 = pct(samples, 0.5), pct(samples, 0.95)
        ratio = ""
        if side == "console":
            api = next(results[k] for k in keys if k.startswith(f"{shape}|{name}|API|"))
            ratio = f"{p50 / pct(api, 0.5):9.2f} {p95 / pct(api, 0.95):9.2f}"
        lines.append(
            f"{shape:30} {name:10} {side:8} {path:30} {len(samples):4} {p50 * 1e3:8.2f}"
            f" {p95 * 1e3:8.2f} {ratio}"
        )
    return lines


# (b) notifications ------------------------------------------------------------------------


class _Stamped(list):
    """Receiver.requests with the time each request arrived (the handler appends to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, item: Any) -> None:
        self.at.append(time.time())
        super().append(item)


def stamped(rx: Receiver) -> _Stamped:
    with rx.lock:
        rx.requests = _Stamped()
        return rx.requests


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def kill(client: httpx.Client) -> float:
    start = time.perf_counter()
    answer = client.post("/kill", json={"all": True, "reason": "bench"})
    took = time.perf_counter() - start
    assert answer.status_code == 200 and answer.json()["stopped"] == [], answer.text[:300]
    return took


def notifications(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    with ExitStack() as stack:
        fast = stack.enter_context(receiver())
        slow = stack.enter_context(receiver(delay_s=SLOW_RECEIVER_S))
        arrived = stamped(fast)
        slow_arrived = stamped(slow)
        planes = {
            "no webhook": stack.enter_context(plane(root, "plain")),
            "webhook, receiver answers at once": stack.enter_context(
                plane(root, "fast", hook_url=fast.url)
            ),
            f"webhook, receiver sleeps {SLOW_RECEIVER_S:g} s": stack.enter_context(
                plane(root, "slow", hook_url=slow.url)
            ),
        }
        clients = {name: stack.enter_context(socket_client(s)) for name, (s, _) in planes.items()}
        for client in clients.values():  # warm: the first kill builds the sandbox manager
            kill(client)
        fast.wait_for(1)
        slow.wait_for(1, timeout=SLOW_RECEIVER_S + 10)
        names = list(clients)
        jitter = random.Random(15)
        for i in range(args.events):
            # the audit follower reads every POLL_EVERY_S: a random pause first, or kills paced
            # by the lag itself would land at one phase of its cycle every time
            time.sleep(jitter.uniform(0, POLL_EVERY_S))
            for name in names[i % 3 :] + names[: i % 3]:  # rotate who goes first
                started = time.time()
                took = kill(clients[name])
                results.setdefault(f"kill|{name}", []).append(took)
                if name != names[1]:
                    continue
                got = fast.wait_for(i + 2)[-1]  # this kill's webhook, before the next kill
                body = json.loads(got.body)
                assert body["event"] == "agent.killed", body
                headers = {k.lower(): v for k, v in got.headers.items()}
                assert verify(
                    SECRET.encode(),
                    headers[TIMESTAMP_HEADER.lower()],
                    got.body,
                    headers[SIGNATURE_HEADER.lower()],
                ), "a badly signed webhook"
                results.setdefault("lag|audit record -> receiver", []).append(
                    arrived.at[i + 1] - epoch(body["ts"])
                )
                results.setdefault("lag|kill call -> receiver", []).append(
                    arrived.at[i + 1] - started
                )
        results["slow receiver: webhooks received meanwhile"] = [float(len(slow_arrived) - 1)]
    return results


def notify_table(results: dict[str, list[float]]) -> list[str]:
    lines = [f"{'':56} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}"]
    for key, samples in results.items():
        if "|" not in key:
            continue
        kind, name = key.split("|")
        label = f"{'POST /api/v1/kill' if kind == 'kill' else 'notification lag'}: {name}"
        lines.append(
            f"{label:56} {len(samples):4} {pct(samples, 0.5) * 1e3:8.2f}"
            f" {pct(samples, 0.95) * 1e3:8.2f} {max(samples) * 1e3:8.2f}"
        )
    slow = results.get("slow receiver: webhooks received meanwhile")
    if slow:
        lines.append(
            f"(when the last kill had returned, the {SLOW_RECEIVER_S:g} s receiver had taken"
            f" {slow[0]:.0f} of the {len(results['lag|kill call -> receiver'])} webhooks: the"
            " rest were queued; no decision waited for them)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating console/API rounds")
    parser.add_argument("--requests", type=int, default=30, help="1 poller's requests a round")
    parser.add_argument("--interval-ticks", type=int, default=2, help="page-interval ticks")
    parser.add_argument("--events", type=int, default=20, help="kills (notifications)")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        root = Path(tmp)
        port = free_port()
        with plane(root, "console", port=port) as (state, _):
            with socket_client(state) as admin:
                made = admin.post("/operators", json={"name": "bench", "role": "operator"})
                made.raise_for_status()
            base = f"http://127.0.0.1:{port}"
            polled = asyncio.run(polling(base, made.json()["secret"], args))
        notified = notifications(root, args)
    took = time.monotonic() - began
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}, ran {took:.0f} s")
    print("\n".join(polling_table(polled)))
    print()
    print("\n".join(notify_table(notified)))
    if args.json:
        args.json.write_text(json.dumps({"polling": polled, "notify": notified}, indent=1))


if __name__ == "__main__":
    main()
