"""/one-tap/{token}: GET only shows (a link previewer approves nothing), the page's POST approves
once as webhook:<hook> (audited), and every refusal is a page with the status that says why. The
plane, its store, locks, audit chain and the console's templates are real; the proxies' admin
sockets are the boundary replaced (tests/fakes/held_proxy.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.audit import audit_path, records
from appliance.config import load_config
from appliance.control.api import create_app
from appliance.control.plane import ControlPlane
from tests.console_fixtures import BASE
from tests.fakes.held_proxy import HeldProxy, use_proxy


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    p = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> HeldProxy:
    held = HeldProxy()
    use_proxy(monkeypatch, held)
    return held


@pytest.fixture
def client(plane: ControlPlane) -> Iterator[TestClient]:
    """The control plane's real app (its host check, audit trail, security headers)."""
    with TestClient(create_app(plane), base_url=BASE, follow_redirects=False) as c:
        yield c


def _audited(plane: ControlPlane, event: str) -> list[dict[str, Any]]:
    return [r for r in records(audit_path(plane.config.state_dir)) if r["event"] == event]


def _link(plane: ControlPlane, entry: dict[str, Any], hook: str = "phone") -> str:
    token = plane.one_tap.mint(entry["id"], entry["expires"], hook, sandbox=entry["sandbox"])
    return "/one-tap/" + token


def _tap(client: TestClient, link: str, confirm: str = "approve") -> Any:
    return client.post(link, data={"confirm": confirm})


def test_get_only_shows_and_post_approves_once(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    entry = proxy.hold("ab12", host="api.example.com", port=8443)
    link = _link(plane, entry)

    for _ in range(3):  # a chat app's previewer, a mail scanner, the operator: GETs
        page = client.get(link)
        assert page.status_code == 200 and 'data-outcome="confirm"' in page.text
    assert proxy.decided == [] and not _audited(plane, "control.approval.approved")
    text = page.text
    assert "api.example.com" in text and "8443" in text and ">box<" in text and "GET /a" in text
    assert f'action="{link}"' in text and 'name="confirm" value="approve"' in text
    assert "Time left" in text and "expired" not in text.split("Time left", 1)[1][:80]
    assert "Log out" not in text  # no login: no session, no navigation
    assert page.headers["referrer-policy"] == "no-referrer"  # the token stays in the URL bar
    assert "form-action 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"

    done = _tap(client, link)
    assert done.status_code == 200 and 'data-outcome="approved"' in done.text
    assert proxy.decided == [("ab12", "approved", "approved by operator")]
    (record,) = _audited(plane, "control.approval.approved")
    assert record["approval"] == "ab12" and record["persist"] is False
    assert record["actor"] == "webhook:phone" and record["actor_kind"] == "link"
    assert plane.approvals.decisions.get("ab12")["actor"] == "webhook:phone"

    replay = _tap(client, link)
    assert replay.status_code == 409 and "already used" in replay.text
    assert client.get(link).status_code == 409
    assert len(proxy.decided) == 1 and len(_audited(plane, "control.approval.approved")) == 1
    # The API's audit trail: both POSTs by the webhook, the token (a credential) not recorded
    trail = [r for r in _audited(plane, "control.request") if r["path"].startswith("/one-tap/")]
    assert [(r["actor"], r["actor_kind"], r["status"]) for r in trail] == [
        ("webhook:phone", "link", 200),
        ("webhook:phone", "link", 409),
    ]
    assert all(r["path"] == "/one-tap/<token>" for r in trail)
    token = link.rsplit("/", 1)[1]
    assert token not in audit_path(plane.config.state_dir).read_text()


def test_a_post_without_the_pages_confirmation_approves_nothing(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    link = _link(plane, proxy.hold("ab12"))
    for confirm in ("", "yes", "approve " * 100):
        assert _tap(client, link, confirm).status_code == 400
    assert client.post(link).status_code == 400
    assert proxy.decided == []
    assert _tap(client, link).status_code == 200  # the link itself was not used up


def test_an_approval_decided_meanwhile_is_a_conflict_page(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    from appliance.control.api.deps import Principal

    entry = proxy.hold("ab12")
    link = _link(plane, entry)
    plane.approvals.deny(Principal("token", "bob", "operator"), "ab12")
    shown = client.get(link)
    assert shown.status_code == 409 and "already denied by bob" in shown.text
    tapped = _tap(client, link)
    assert tapped.status_code == 409 and "already denied" in tapped.text
    assert proxy.decided == [("ab12", "denied", "denied by operator")]


def test_an_approval_that_expired_is_refused(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    entry = proxy.hold("ab12", hold_s=60)
    link = _link(plane, entry)  # the link outlives the approval here: the expiry still wins
    proxy.pending[0]["expires"] = time.time() - 1
    plane.approvals.expire_due()
    shown = client.get(link)
    assert shown.status_code == 409 and 'data-outcome="expired"' in shown.text
    tapped = _tap(client, link)
    assert tapped.status_code == 409 and "already expired" in tapped.text
    assert [d[1] for d in proxy.decided] == ["denied"]


def test_an_expired_link_is_gone(client: TestClient, plane: ControlPlane, proxy: HeldProxy) -> None:
    entry = proxy.hold("ab12")
    link = "/one-tap/" + plane.one_tap.mint("ab12", time.time() - 1, "phone", sandbox="box")
    for answer in (client.get(link), _tap(client, link)):
        assert answer.status_code == 410 and 'data-outcome="expired"' in answer.text
    assert proxy.decided == [] and entry["id"] == "ab12"


def test_a_link_for_an_approval_nobody_holds(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    proxy.hold("ab12")
    other = "/one-tap/" + plane.one_tap.mint("cd34", time.time() + 60, "phone", sandbox="box")
    shown = client.get(other)
    assert shown.status_code == 404 and "no longer held" in shown.text
    assert _tap(client, other).status_code == 404
    assert proxy.decided == []  # the approval that is held was not touched


@pytest.mark.parametrize(
    "token",
    [
        "x" * 10_000,
        "..%2F..%2Fsecrets%2Fone-tap.key",
        "....%2F",
        "%00",
        "not.a-token",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    ],
)
def test_hostile_tokens_are_refused_cleanly(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy, token: str
) -> None:
    proxy.hold("ab12")
    before = len(_audited(plane, "control.request"))
    client.follow_redirects = True  # "..../" is sent to "...." first (a trailing slash)
    for answer in (client.get(f"/one-tap/{token}"), _tap(client, f"/one-tap/{token}")):
        assert answer.status_code == 404, answer.text[:200]
        assert answer.url.host == "127.0.0.1"  # never sent elsewhere
        assert "<script>" not in answer.text
    assert proxy.decided == []
    for _ in range(20):  # a flood of forged POSTs: counted, not one audit record each
        _tap(client, f"/one-tap/{token}")
    assert len(_audited(plane, "control.request")) - before <= 1


def test_a_forged_token_for_the_held_approval_is_refused(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy, tmp_path: Path
) -> None:
    from appliance.control.one_tap import OneTap

    entry = proxy.hold("ab12")
    stranger = OneTap(tmp_path / "another-appliance")
    forged = "/one-tap/" + stranger.mint("ab12", entry["expires"], "phone", sandbox="box")
    stranger.close()
    for answer in (client.get(forged), _tap(client, forged)):
        assert answer.status_code == 404 and "signature" in answer.text
    assert proxy.decided == []


def test_names_are_escaped_on_the_page(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    entry = proxy.hold("ab12", host='"><script>alert(1)</script>')
    page = client.get(_link(plane, entry))
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text


def test_a_link_for_sandbox_a_never_approves_sandbox_bs_request(
    client: TestClient, plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Approval ids are random per proxy: B's proxy may hold the id A's link names."""
    from contextlib import contextmanager

    from appliance.control import approvals

    proxy_a, proxy_b = HeldProxy(), HeldProxy()

    @contextmanager
    def clients(_m: object) -> Iterator[dict[str, object]]:
        yield {"box-b": proxy_b, "box-a": proxy_a}  # B is asked first

    monkeypatch.setattr(approvals, "admin_clients", clients)
    entry = proxy_a.hold("ab12", host="a.example.com")
    proxy_a.pending.clear()  # A's request settled; B now holds a request under the same id
    held_b = proxy_b.hold("ab12", host="b.example.com")
    held_b["sandbox"] = proxy_b.pending[0]["sandbox"] = "box-b"
    link = "/one-tap/" + plane.one_tap.mint("ab12", entry["expires"], "phone", sandbox="box-a")

    shown = client.get(link)
    assert shown.status_code == 404 and "b.example.com" not in shown.text
    tapped = _tap(client, link)
    assert tapped.status_code == 404 and "of sandbox box-a" in tapped.text
    assert proxy_b.decided == [] and len(proxy_b.pending) == 1
    assert not _audited(plane, "control.approval.approved")


def test_a_link_naming_no_sandbox_approves_nothing(
    client: TestClient, plane: ControlPlane, proxy: HeldProxy
) -> None:
    entry = proxy.hold("ab12")
    link = "/one-tap/" + plane.one_tap.mint("ab12", entry["expires"], "phone")
    for answer in (client.get(link), _tap(client, link)):
        assert answer.status_code == 404 and "names no sandbox" in answer.text
    assert proxy.decided == []
