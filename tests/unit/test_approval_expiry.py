"""Approvals expire in the control plane: its expirer denies what is past `expires`, records the
decision "expired" (a later approve is a 409), audits approval.expired, and races an operator's
approve with exactly one winner. The decisions taken are listed newest first (history). The
proxies' admin sockets are the boundary replaced (tests/fakes/held_proxy.py); the plane, its
locks, the store and the audit chain are real."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import audit_path, records
from appliance.config import load_config
from appliance.control import approvals
from appliance.control.api.deps import Principal
from appliance.control.plane import ControlPlane
from appliance.errors import ConflictError, NotFoundError
from tests.fakes.held_proxy import HeldProxy, use_proxy

WHO = Principal("token", "alice", "operator")


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    p = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    try:
        yield p
    finally:
        p.close()


def _audited(plane: ControlPlane, event: str) -> list[dict[str, Any]]:
    return [r for r in records(audit_path(plane.config.state_dir)) if r["event"] == event]


def test_a_past_due_request_is_denied_recorded_and_audited(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    proxy.hold("aa01")
    proxy.hold("aa02", hold_s=60.0)  # still in time
    proxy.pending[0]["created"] -= 30.0  # held 30 s ago for 2 s: long past due
    proxy.pending[0]["expires"] = proxy.pending[0]["created"] + 2.0

    expired = plane.approvals.expire_due()

    assert [e["id"] for e in expired] == ["aa01"] and expired[0]["decision"] == "expired"
    assert proxy.decided == [("aa01", "denied", "expired: not answered within 2s")]
    assert [p["id"] for p in proxy.list()] == ["aa02"]  # the one in time is left alone
    (record,) = _audited(plane, "approval.expired")
    assert record["approval"] == "aa01" and record["sandbox"] == "box"
    assert (record["host"], record["port"], record["method"]) == ("example.com", 443, "GET")
    assert record["actor"] == "expirer" and record["actor_kind"] == "system"
    assert 28.0 <= record["waited_s"] <= 31.0
    with pytest.raises(ConflictError, match=r"already expired .* by expirer") as late:
        plane.approvals.approve(WHO, "aa01", persist=False)
    assert "example.com:443" in str(late.value)
    assert plane.approvals.expire_due() == []  # nothing past due left: nothing done twice
    assert len(_audited(plane, "approval.expired")) == 1


def test_an_entry_without_expires_or_with_a_bad_id_is_left_alone(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older proxy's entries carry no `expires`: only its own timeout ends them."""
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    old = proxy.hold("bb01")
    del old["expires"]
    proxy.pending[0] = old
    proxy.hold("../x", hold_s=-5.0)  # not an id a proxy makes
    assert plane.approvals.expire_due() == [] and proxy.decided == []


class _Wedged(HeldProxy):
    def deny(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        raise TimeoutError("no answer in 5 s")


def test_a_wedged_proxy_is_tried_again_on_the_next_pass(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = _Wedged()
    use_proxy(monkeypatch, proxy)
    proxy.hold("cc01", hold_s=-1.0)
    assert plane.approvals.expire_due() == []
    assert plane.approvals.decisions.get("cc01") is None  # not recorded: it did not happen
    assert _audited(plane, "approval.expired") == []
    proxy.__class__ = HeldProxy  # it answers again
    assert [e["id"] for e in plane.approvals.expire_due()] == ["cc01"]


def test_the_expirer_thread_runs_until_stopped(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    monkeypatch.setattr(approvals, "EXPIRE_EVERY_S", 0.05)
    proxy.hold("dd01", hold_s=0.3)
    stop = threading.Event()
    thread = threading.Thread(target=plane.approvals.run_expirer, args=(stop,))
    start = time.monotonic()
    thread.start()
    try:
        while not proxy.decided and time.monotonic() - start < 5:
            time.sleep(0.02)
        waited = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert proxy.decided and proxy.decided[0][:2] == ("dd01", "denied")
    assert 0.2 <= waited <= 1.5  # at its expiry, not at the proxy's backstop


def _race(plane: ControlPlane, approval_id: str) -> dict[str, Any]:
    """An operator's approve and an expiry pass, released at the same instant."""
    barrier = threading.Barrier(2)
    results: dict[str, Any] = {}

    def operator() -> None:
        barrier.wait()
        try:
            results["approve"] = plane.approvals.approve(WHO, approval_id, persist=False)
        except (ConflictError, NotFoundError) as exc:
            results["approve"] = exc

    def expirer() -> None:
        barrier.wait()
        results["expire"] = plane.approvals.expire_due()

    threads = [threading.Thread(target=operator), threading.Thread(target=expirer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_an_approve_racing_the_expiry_has_exactly_one_winner(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    rounds = 25
    outcomes: dict[str, int] = {"approved": 0, "expired": 0}
    for n in range(rounds):
        approval_id = f"e{n:03x}"
        proxy.hold(approval_id, hold_s=-0.001)  # past due just as the operator answers
        results = _race(plane, approval_id)
        settled = [d for d in proxy.decided if d[0] == approval_id]
        assert len(settled) == 1, settled  # the proxy was answered once
        approved = isinstance(results["approve"], dict)
        assert approved != bool(results["expire"]), results  # one winner, never both
        if not approved:  # the operator lost: told it expired, by whom (409, not a 404)
            assert isinstance(results["approve"], ConflictError), results
            assert "already expired" in str(results["approve"])
        recorded = plane.approvals.decisions.get(approval_id)
        assert recorded is not None
        assert recorded["decision"] == ("approved" if approved else "expired")
        outcomes[recorded["decision"]] += 1
    assert sum(outcomes.values()) == rounds
    assert len(_audited(plane, "approval.expired")) == outcomes["expired"]
    assert len(_audited(plane, "control.approval.approved")) == outcomes["approved"]


def test_history_lists_decisions_newest_first(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    for approval_id in ("f1", "f2", "f3"):
        proxy.hold(approval_id, host=f"{approval_id}.example.com")
    plane.approvals.approve(WHO, "f1", persist=False)
    plane.approvals.deny(WHO, "f2")
    proxy.pending[0]["expires"] = time.time() - 1
    plane.approvals.expire_due()

    history = plane.approvals.history(10)
    assert [(h["id"], h["decision"], h["actor"]) for h in history] == [
        ("f3", "expired", "expirer"),
        ("f2", "denied", "alice"),
        ("f1", "approved", "alice"),
    ]
    assert history[0]["host"] == "f3.example.com" and history[0]["decided_at"] <= time.time()
    assert [h["id"] for h in plane.approvals.history(2)] == ["f3", "f2"]
    assert len(plane.approvals.history(0)) == 1 and len(plane.approvals.history(10**9)) == 3


def test_the_pending_list_says_age_and_time_left(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    entry = proxy.hold("0a1", hold_s=20.0)
    entry_no_expiry = proxy.hold("0a2")
    del proxy.pending[1]["expires"]
    proxy.pending[0]["created"] -= 5
    (listed, bare) = plane.approvals.list()
    assert 4.5 <= listed["age_s"] <= 6 and 19 <= listed["expires_in_s"] <= 20
    assert listed["method"] == entry["method"] and listed["path"] == "/a"
    assert "expires_in_s" not in bare and bare["id"] == entry_no_expiry["id"]


def test_history_over_the_api_for_a_viewer(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from appliance.control.api import create_app

    proxy = HeldProxy()
    use_proxy(monkeypatch, proxy)
    proxy.hold("0b1")
    plane.approvals.approve(WHO, "0b1", persist=False)
    proxy.hold("0b2", hold_s=-1)
    plane.approvals.expire_due()
    setup = Principal("system", "test-setup", "admin").audit_fields()
    _, token = plane.operators.create("vera", "viewer", setup)
    with TestClient(create_app(plane), base_url="http://127.0.0.1:8070") as api:
        auth = {"Authorization": f"Bearer {token}"}
        listed = api.get("/api/v1/approvals/history", headers=auth)
        assert listed.status_code == 200, listed.text
        assert [(h["id"], h["decision"]) for h in listed.json()] == [
            ("0b2", "expired"),
            ("0b1", "approved"),
        ]
        one = api.get("/api/v1/approvals/history?limit=1", headers=auth).json()
        assert [h["id"] for h in one] == ["0b2"]
        for bad in ("0", "1001", "x"):
            refused = api.get(f"/api/v1/approvals/history?limit={bad}", headers=auth)
            assert refused.status_code == 422 and "error" in refused.json()
        assert api.get("/api/v1/approvals/history").status_code == 401
        # a viewer reads; deciding is still an operator's
        assert api.post("/api/v1/approvals/0b3/approve", headers=auth).status_code == 403


def test_a_failing_pass_is_logged_once_not_twice_a_second(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    passes: list[float] = []

    def broken(now: float | None = None) -> list[dict[str, Any]]:
        passes.append(time.monotonic())
        raise OSError("store unreadable")

    monkeypatch.setattr(approvals, "EXPIRE_EVERY_S", 0.01)
    monkeypatch.setattr(plane.approvals, "expire_due", broken)
    stop = threading.Event()
    thread = threading.Thread(target=plane.approvals.run_expirer, args=(stop,))
    thread.start()
    while len(passes) < 10:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()  # a failing pass does not end the thread
    failures = [r for r in caplog.records if "expiry pass failed" in r.getMessage()]
    assert len(failures) == 1
