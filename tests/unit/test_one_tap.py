"""One-tap approval links: the token (signed, expiring, single use) and its key, and the links'
console base. The routes are in tests/unit/test_one_tap_pages.py."""

from __future__ import annotations

import base64
import json
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.config import load_config
from appliance.control.one_tap import (
    LinkExpired,
    LinkInvalid,
    LinkUsed,
    OneTap,
    approval_link,
    load_key,
)
from appliance.errors import ConflictError, NotFoundError


@pytest.fixture
def one_tap(tmp_path: Path) -> OneTap:
    service = OneTap(tmp_path / "state")
    yield service
    service.close()


def _later(seconds: float = 60.0) -> float:
    return time.time() + seconds


def _redeemed(one_tap: OneTap, token: str) -> tuple[str, str]:
    """(approval id, webhook) of a token used up just now."""
    claim = one_tap.claim(token)
    return claim.approval_id, claim.webhook


def test_a_token_approves_one_approval_once(one_tap: OneTap) -> None:
    token = one_tap.mint("ab12cd34", _later(), "phone")
    assert len(token) < 200 and token.isascii() and "/" not in token
    claim = one_tap.verify(token)
    assert (claim.approval_id, claim.webhook) == ("ab12cd34", "phone")
    assert not one_tap.used(claim)
    assert one_tap.verify(token) == claim  # checking does not use it up (the GET page)
    assert _redeemed(one_tap, token) == ("ab12cd34", "phone")
    assert one_tap.used(claim)
    with pytest.raises(LinkUsed, match="already used") as again:
        one_tap.claim(token)
    assert isinstance(again.value, ConflictError) and again.value.hint  # HTTP 409, exit 10
    other = one_tap.mint("ab12cd34", _later(), "phone")  # a second link: its own nonce
    assert other != token and _redeemed(one_tap, other) == ("ab12cd34", "phone")


def test_the_key_is_private_made_once_and_shared(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = OneTap(state)
    token = first.mint("ab12", _later(), "phone")
    key_file = state / "secrets" / "one-tap.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    second = OneTap(state)  # another process, the same key: its links verify here
    assert second.verify(token).approval_id == "ab12"
    assert [p.name for p in key_file.parent.iterdir()] == ["one-tap.key"]  # no temp left
    first.close()
    second.close()


def test_racing_first_uses_agree_on_one_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        keys.append(load_key(state))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32


def test_a_short_key_file_is_a_clear_error(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "state" / "secrets"
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "one-tap.key").write_bytes(b"short")
    service = OneTap(tmp_path / "state")
    with pytest.raises(Exception, match="one-tap signing key is 5 bytes") as bad:
        service.mint("ab12", _later(), "phone")
    assert "remove" in (bad.value.hint or "")
    service.close()


def test_forged_tokens_are_refused(one_tap: OneTap, tmp_path: Path) -> None:
    token = one_tap.mint("ab12", _later(), "phone")
    payload, mac = token.split(".")
    stranger = OneTap(tmp_path / "elsewhere")  # another appliance's key
    forged = [
        stranger.mint("ab12", _later(), "phone"),
        f"{payload}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",  # the mac changed
        f"{OneTap.__name__}.{mac}",  # another payload under a genuine mac
        f"{payload[:-2]}{payload[-1]}{payload[-2]}.{mac}",
    ]
    for bad in forged:
        with pytest.raises(LinkInvalid, match=r"signature does not match|not valid"):
            one_tap.verify(bad)
        with pytest.raises(LinkInvalid):
            one_tap.claim(bad)
    stranger.close()
    assert _redeemed(one_tap, token) == ("ab12", "phone")  # the refusals used up nothing


@pytest.mark.parametrize(
    "garbled",
    [
        "",
        ".",
        "x" * 10_000,
        "A" * 400 + "." + "B" * 43 + "C" * 9_000,
        "../../etc/passwd",
        "..%2F..%2Fsecrets%2Fone-tap.key",
        "abc.def",
        "a.b.c",
        "é" * 20 + "." + "x" * 43,
        "abc\x00.def",
        "<script>alert(1)</script>",
    ],
)
def test_garbled_tokens_are_refused(one_tap: OneTap, garbled: str) -> None:
    with pytest.raises(LinkInvalid, match="not valid") as refused:
        one_tap.claim(garbled)
    assert isinstance(refused.value, NotFoundError)  # HTTP 404: a guess learns nothing


def test_an_expired_token_is_refused(one_tap: OneTap) -> None:
    token = one_tap.mint("ab12", time.time() + 0.2, "phone")
    claim = one_tap.verify(token)
    with pytest.raises(LinkExpired, match="expired with approval ab12"):
        one_tap.verify(token, now=claim.expires_at)
    time.sleep(0.3)
    with pytest.raises(LinkExpired):
        one_tap.claim(token)
    with pytest.raises(LinkExpired):
        one_tap.claim(one_tap.mint("ab12", time.time() - 1, "phone"))


def test_minting_refuses_what_a_link_could_not_name(one_tap: OneTap) -> None:
    for approval_id, hook in [("../x", "phone"), ("AB", "phone"), ("ab12", "a/b"), ("ab", "")]:
        with pytest.raises(ValueError):
            one_tap.mint(approval_id, _later(), hook)
    for sandbox in ("../x", "Box", "", "a" * 64):
        with pytest.raises(ValueError, match="sandbox"):
            one_tap.mint("ab12", _later(), "phone", sandbox=sandbox)


def test_the_sandbox_is_signed_into_the_token(one_tap: OneTap) -> None:
    token = one_tap.mint("ab12", _later(), "phone", sandbox="box-a")
    assert one_tap.verify(token).sandbox == "box-a"
    assert one_tap.verify(one_tap.mint("ab12", _later(), "phone")).sandbox is None
    payload, mac = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["s"] = "box-b"  # another sandbox's held request with the same id: a new signature
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(LinkInvalid, match="signature"):
        one_tap.verify(f"{forged}.{mac}")


def test_ten_taps_at_once_approve_once(one_tap: OneTap) -> None:
    token = one_tap.mint("ab12", _later(), "phone")
    barrier = threading.Barrier(10)
    won: list[tuple[str, str]] = []
    lost: list[Exception] = []

    def tap() -> None:
        barrier.wait()
        try:
            won.append(_redeemed(one_tap, token))
        except LinkUsed as exc:
            lost.append(exc)

    threads = [threading.Thread(target=tap) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert won == [("ab12", "phone")] and len(lost) == 9


def test_two_processes_worth_of_services_share_the_nonces(tmp_path: Path) -> None:
    """A restarted control plane (or a second one on the same state dir) refuses a replay."""
    first = OneTap(tmp_path / "state")
    token = first.mint("ab12", _later(), "phone")
    assert first.claim(token).approval_id == "ab12"
    first.close()
    second = OneTap(tmp_path / "state")
    with pytest.raises(LinkUsed):
        second.claim(token)
    second.close()


def test_used_nonces_are_pruned_a_day_after_their_link_expired(one_tap: OneTap) -> None:
    old = one_tap.mint("ab12", _later(), "phone")
    one_tap.claim(old)
    one_tap._conn.execute("UPDATE one_tap_nonces SET expires_at = ?", (time.time() - 90_000,))
    one_tap._conn.commit()
    one_tap.claim(one_tap.mint("cd34", _later(), "phone"))
    rows = one_tap._conn.execute("SELECT approval FROM one_tap_nonces").fetchall()
    assert rows == [("cd34",)]


def test_links_point_at_the_console(tmp_path: Path) -> None:
    config = load_config({"state_dir": str(tmp_path), "control": {"port": 8070}})
    assert approval_link(config, "ab12") == "http://127.0.0.1:8070/approvals#a-ab12"
    assert approval_link(config, "ab12", "t.k") == "http://127.0.0.1:8070/one-tap/t.k"
    v6 = load_config({"state_dir": str(tmp_path), "control": {"host": "::1", "port": 9000}})
    assert approval_link(v6, "ab12") == "http://[::1]:9000/approvals#a-ab12"
    proxied = SimpleNamespace(
        notify=SimpleNamespace(console_url="https://ops.example.com/appliance/"),
        control=config.control,
    )
    assert approval_link(proxied, "ab12", "t.k") == "https://ops.example.com/appliance/one-tap/t.k"
    unset = SimpleNamespace(notify=SimpleNamespace(console_url=None), control=config.control)
    assert approval_link(unset, "ab12").startswith("http://127.0.0.1:8070/")
    socket_only = load_config({"state_dir": str(tmp_path), "control": {"port": None}})
    assert approval_link(socket_only, "ab12") == "http://127.0.0.1/approvals#a-ab12"
