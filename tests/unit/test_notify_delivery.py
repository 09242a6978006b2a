"""Delivering notifications (appliance/control/notify/delivery.py) to a real local HTTP
receiver: retries with backoff, what is not retried, the bounded queue, and every outcome in the
(real) audit chain."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import ChainWriter, audit_path
from appliance.config import WebhookConfig
from appliance.control.notify.delivery import Deliverer, RetryPolicy
from appliance.control.notify.events import NotifyEvent
from appliance.control.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.notify_fixtures import receiver

SECRET = "delivery-test-secret"
FAST = RetryPolicy(max_attempts=4, base_s=0.01, cap_s=0.05, retry_after_cap_s=0.3)
EVENT = NotifyEvent("agent.killed", "2026-12-08T00:00:00Z", "ev1", {"sandboxes": ["a"]})


def hook(url: str, **kw: Any) -> WebhookConfig:
    return WebhookConfig(
        **{"name": "ops", "url": url, "events": ["agent.killed"], "secret_env": "HOOK_S", **kw}
    )


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChainWriter:
    monkeypatch.setenv("HOOK_S", SECRET)
    return ChainWriter(audit_path(tmp_path / "state"))


@pytest.fixture
def deliverer(chain: ChainWriter) -> Iterator[Deliverer]:
    d = Deliverer(chain.append, FAST)
    d.start()
    yield d
    d.close()


def outcomes(chain: ChainWriter, timeout: float = 5.0, want: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = []
        if chain.path.exists():
            recs = [json.loads(line) for line in chain.path.read_text().splitlines()]
        found = [r for r in recs if r["event"].startswith("notify.")]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_fails_twice_then_delivered_after_three_attempts_and_audited(
    deliverer: Deliverer, chain: ChainWriter
) -> None:
    with receiver([503, 502]) as rx:
        deliverer.submit(hook(rx.url), EVENT)
        got = rx.wait_for(3)
        [audited] = outcomes(chain)
    assert audited["event"] == "notify.delivered"
    assert audited["hook"] == "ops" and audited["notification"] == "agent.killed"
    assert audited["attempts"] == 3 and audited["status"] == 200 and "error" not in audited
    assert audited["event_id"] == "ev1"
    for req in got:  # each attempt signed afresh, over exactly the body sent
        ts, sig = req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER]
        assert verify(SECRET.encode(), ts, req.body, sig)
        assert json.loads(req.body)["event"] == "agent.killed"
    last = deliverer.last("ops")
    assert last is not None and last.ok and last.attempts == 3
    assert SECRET not in chain.path.read_text()


def test_a_4xx_is_not_retried(deliverer: Deliverer, chain: ChainWriter) -> None:
    with receiver([403]) as rx:
        deliverer.submit(hook(rx.url), EVENT)
        [audited] = outcomes(chain)
        time.sleep(0.2)  # would a retry come? (backoff is 10-50 ms)
        assert len(rx.requests) == 1
    assert audited["event"] == "notify.failed"
    assert audited["attempts"] == 1 and audited["status"] == 403 and audited["error"] == "HTTP 403"


def test_gives_up_after_max_attempts(deliverer: Deliverer, chain: ChainWriter) -> None:
    with receiver([500] * 10) as rx:
        deliverer.submit(hook(rx.url), EVENT)
        [audited] = outcomes(chain)
        assert len(rx.requests) == 4
    assert audited["event"] == "notify.failed" and audited["attempts"] == 4
    assert audited["status"] == 500


def test_429_waits_for_retry_after(deliverer: Deliverer, chain: ChainWriter) -> None:
    with receiver([(429, {"Retry-After": "30"})]) as rx:
        deliverer.submit(hook(rx.url), EVENT)
        rx.wait_for(1)
        start = time.monotonic()
        rx.wait_for(2)
        waited = time.monotonic() - start
    assert 0.25 <= waited < 5.0  # honoured up to the cap (0.3 s here): not 10-50 ms, not 30 s
    assert outcomes(chain)[0]["attempts"] == 2


def test_no_connection_is_retried_and_the_url_not_audited(
    deliverer: Deliverer, chain: ChainWriter
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/secret-path-token"
    deliverer.submit(hook(url), EVENT)
    [audited] = outcomes(chain)
    assert audited["event"] == "notify.failed" and audited["attempts"] == 4
    assert audited["status"] is None and "ConnectError" in audited["error"]
    assert "secret-path-token" not in chain.path.read_text()


def test_a_redirect_is_not_followed(deliverer: Deliverer, chain: ChainWriter) -> None:
    with receiver([(302, {"Location": "http://127.0.0.1:1/elsewhere"})]) as rx:
        deliverer.submit(hook(rx.url), EVENT)
        [audited] = outcomes(chain)
        assert len(rx.requests) == 1
    assert audited["status"] == 302 and "not followed" in audited["error"]


def test_a_missing_secret_fails_without_sending(
    deliverer: Deliverer, chain: ChainWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOOK_S")
    with receiver() as rx:
        deliverer.submit(hook(rx.url), EVENT)
        [audited] = outcomes(chain)
        assert rx.requests == []
    assert audited["attempts"] == 1 and "HOOK_S is not set" in audited["error"]


def test_a_secret_file_readable_by_everyone_is_refused(
    deliverer: Deliverer, chain: ChainWriter, tmp_path: Path
) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("from-a-file\n")
    secret.chmod(0o644)
    with receiver() as rx:
        deliverer.submit(hook(rx.url, secret_env=None, secret_file=secret), EVENT)
        [audited] = outcomes(chain)
        assert rx.requests == [] and "readable by every user" in audited["error"]
        secret.chmod(0o600)
        outcome = deliverer.deliver_now(hook(rx.url, secret_env=None, secret_file=secret), EVENT)
        [req] = rx.wait_for(1)
    assert outcome.ok and outcome.status == 200
    ts, sig = req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER]
    assert verify(b"from-a-file", ts, req.body, sig)  # the trailing newline is not the secret


def test_an_unsigned_slack_hook_gets_no_signature(deliverer: Deliverer) -> None:
    with receiver() as rx:
        deliverer.submit(hook(rx.url, format="slack", secret_env=None), EVENT)
        [req] = rx.wait_for(1)
    assert SIGNATURE_HEADER not in req.headers and "text" in json.loads(req.body)


def test_a_slow_receiver_delays_only_its_own_deliveries(
    deliverer: Deliverer, chain: ChainWriter
) -> None:
    with receiver([500] * 3) as failing, receiver() as healthy:
        deliverer.submit(hook(failing.url, name="down"), EVENT)
        deliverer.submit(hook(healthy.url, name="up"), EVENT)
        healthy.wait_for(1, timeout=2)
        failing.wait_for(4)


def test_a_url_the_client_refuses_is_final_and_the_worker_goes_on(
    deliverer: Deliverer, chain: ChainWriter
) -> None:
    bad = WebhookConfig.model_construct(  # past validation, as a hand-built object could be
        name="bad", url="http://a\x00b/", events=["agent.killed"], format="slack",
        secret_env=None, secret_file=None, timeout_s=1.0,
    )  # fmt: skip
    deliverer.submit(bad, EVENT)
    [audited] = outcomes(chain)
    assert audited["event"] == "notify.failed" and audited["attempts"] == 1
    assert "InvalidURL" in audited["error"]
    with receiver() as rx:
        deliverer.submit(hook(rx.url), EVENT)
        rx.wait_for(1)


def test_a_full_queue_never_blocks_and_drops_the_oldest_audited(chain: ChainWriter) -> None:
    d = Deliverer(chain.append, FAST, max_queue=3)  # not started: nothing drains the queue
    events = [NotifyEvent("agent.killed", "t", f"ev{i}", {}) for i in range(10)]
    start = time.monotonic()
    for event in events:
        d.submit(hook("http://127.0.0.1:9/never"), event)
    assert time.monotonic() - start < 1.0
    assert d.pending() == 3
    dropped = [r for r in outcomes(chain, want=7) if r["event"] == "notify.dropped"]
    assert [r["event_id"] for r in dropped] == [f"ev{i}" for i in range(7)]
    assert "queue was full (3)" in dropped[0]["error"]
    d.close()
    assert outcomes(chain, want=8)[-1]["count"] == 3  # what the stop left undelivered


def test_submit_while_the_receiver_hangs_does_not_wait(chain: ChainWriter) -> None:
    d = Deliverer(chain.append, FAST)
    d.start()
    try:
        with receiver(delay_s=1.0) as rx:
            d.submit(hook(rx.url, timeout_s=5), EVENT)
            rx.wait_for(1)  # the worker is now inside a request that takes a second
            start = time.monotonic()
            for i in range(50):
                d.submit(hook(rx.url), NotifyEvent("agent.killed", "t", f"e{i}", {}))
            assert time.monotonic() - start < 0.5
    finally:
        d.close(wait_s=0.1)


def test_retry_after_forms() -> None:
    policy = RetryPolicy(retry_after_cap_s=60)
    assert policy.retry_after("7") == 7.0
    assert policy.retry_after("100000") == 60.0
    assert policy.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert policy.retry_after("soon") is None and policy.retry_after(None) is None
    waits = [policy.backoff(n) for n in (1, 2, 3)]
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0 and 2.0 <= waits[2] <= 4.0


def test_a_full_queue_drops_pending_approvals_before_kills_and_tamper(chain: ChainWriter) -> None:
    d = Deliverer(chain.append, FAST, max_queue=4)  # not started: nothing drains the queue
    ops = hook("http://127.0.0.1:9/never")
    d.submit(ops, EVENT)  # agent.killed, id ev1
    d.submit(ops, NotifyEvent("audit.tamper", "t", "tamper1", {"kind": "chain"}))
    later = time.time() + 30
    for i in range(20):  # a flood of held requests
        d.submit(ops, NotifyEvent("approval.pending", "t", f"p{i}", {}, expires_at=later))
    assert d.pending() == 4
    dropped = [r["event_id"] for r in outcomes(chain, want=18) if r["event"] == "notify.dropped"]
    assert dropped == [f"p{i}" for i in range(18)]  # the kill and the tamper are kept
    d.close()


def test_a_hung_receiver_does_not_delay_another_hooks_deliveries(chain: ChainWriter) -> None:
    d = Deliverer(chain.append, FAST)
    d.start()
    try:
        with receiver(delay_s=3.0) as hung, receiver() as healthy:
            d.submit(hook(hung.url, name="hung", timeout_s=10), EVENT)
            hung.wait_arrived(1)  # its worker is now inside a request that takes 3 s
            d.submit(hook(healthy.url, name="healthy"), EVENT)
            healthy.wait_for(1, timeout=1.0)
            assert hung.requests == []  # still hanging
    finally:
        d.close(wait_s=0.1)


def test_a_pending_approval_past_its_expiry_is_dropped_not_sent(
    deliverer: Deliverer, chain: ChainWriter
) -> None:
    late = NotifyEvent("approval.pending", "t", "late1", {"approval": "ab01"}, expires_at=1.0)
    with receiver() as rx:
        deliverer.submit(hook(rx.url), late)
        [audited] = outcomes(chain)
        deliverer.submit(hook(rx.url), EVENT)
        rx.wait_for(1)
        assert len(rx.requests) == 1 and json.loads(rx.requests[0].body)["id"] == "ev1"
    assert audited["event"] == "notify.dropped" and audited["event_id"] == "late1"
    assert audited["notification"] == "approval.pending"
    assert "expired" in audited["error"]
