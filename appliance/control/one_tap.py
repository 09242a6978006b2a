"""One-tap approval links: a signed, single-use token that approves one held request once.

An `approval.pending` notification (appliance/control/notify) may carry a link a phone can open
without logging in. The link's token is its only credential, so it is narrow: it names one
approval of one sandbox and the webhook it was sent through, expires with the approval, and
works once. The sandbox is signed too: approval ids are random per proxy (32 bits), so an id
alone could name another sandbox's held request; the link approves only its own sandbox's.

Token: `<payload>.<mac>`, both base64url without padding; payload is compact JSON
{"a": approval id, "s": sandbox, "w": webhook name, "e": expires_at (unix s), "n": nonce}; mac is
HMAC-SHA256 over the payload's text with a key kept in <state_dir>/secrets/one-tap.key (0600,
made on first use). The mac is checked (constant time) before anything in the payload is
believed. Single use: redeeming records the nonce in SQLite (one_tap_nonces) in the same
statement that would fail on a second use, so of ten taps at once exactly one wins.

Opening the link (GET) only shows a confirmation page; approving takes a POST from that page
(appliance/console/one_tap.py): link previewers and chat unfurlers fetch URLs with GET.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ConflictError, NotFoundError, StateError
from appliance.store.db import DB_NAME, connect, open_store
from sandbox.names import NAME_RE as _SANDBOX

KEY_BYTES = 32
MAX_TOKEN_CHARS = 512  # a real token is ~150 characters; anything longer is not ours
NONCE_KEPT_S = 86400.0  # a used nonce is kept this long past its link's expiry, then pruned
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,400}\.[A-Za-z0-9_-]{43}")  # payload . 32-byte mac
_ID = re.compile(r"[0-9a-f]{1,64}")  # the proxies' approval ids
_HOOK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LinkInvalid(NotFoundError):
    """A one-tap token that is not ours: garbled, forged, or for something that does not exist
    (HTTP 404: a guessed link learns nothing)."""

    hint = "open the approval in the console instead (`appliance approvals list`)"


class LinkExpired(LinkInvalid):
    """A genuine one-tap token whose approval's time ran out."""


class LinkUsed(ConflictError):
    """A genuine one-tap token used before (HTTP 409)."""

    hint = "each one-tap link approves once; see `appliance approvals history`"


@dataclass(frozen=True)
class Claim:
    """What a verified token says."""

    approval_id: str
    webhook: str
    expires_at: float
    nonce: str
    sandbox: str | None = None  # None: a link that names no sandbox, which approves nothing


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(state_dir: Path) -> bytes:
    """The signing key, made on first use: written to a private temporary file and linked into
    place, so two processes starting at once agree on one key and none reads a half-written
    one."""
    directory = state_dir / "secrets"
    path = directory / "one-tap.key"
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = directory / f".one-tap.key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise StateError(
            f"{path}: the one-tap signing key is {len(key)} bytes (expected {KEY_BYTES})",
            hint=f"remove {path}; a new key is made on next use (links sent before stop working)",
        )
    return key


class OneTap:
    """Mints and redeems one-tap tokens. One SQLite connection shared by the API's threads,
    serialised by a lock (each call is one small statement)."""

    def __init__(self, state_dir: Path) -> None:
        open_store(state_dir).close()  # creates and migrates the database once
        self.state_dir = state_dir
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._conn = connect(state_dir / DB_NAME, any_thread=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_key(self.state_dir)
        return self._key

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode("ascii"), hashlib.sha256).digest())

    def mint(
        self, approval_id: str, expires_at: float, webhook: str, *, sandbox: str | None = None
    ) -> str:
        """A token approving `approval_id` of `sandbox` once, until `expires_at`, sent through
        `webhook`. Without a sandbox the link shows its page but approves nothing."""
        if not _ID.fullmatch(approval_id):
            raise ValueError(f"not an approval id: {approval_id!r}")
        if not _HOOK.fullmatch(webhook):
            raise ValueError(f"not a webhook name: {webhook!r}")
        if sandbox is not None and not _SANDBOX.fullmatch(sandbox):
            raise ValueError(f"not a sandbox name: {sandbox!r}")
        body: dict[str, Any] = {"a": approval_id, "w": webhook, "e": round(float(expires_at), 3)}
        if sandbox is not None:
            body["s"] = sandbox
        body["n"] = secrets.token_hex(12)
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> Claim:
        """The token's claim, if ours and not expired (LinkInvalid / LinkExpired otherwise).
        Does not use it up: the confirmation page (GET) shows what a POST would approve."""
        if (
            not isinstance(token, str)
            or len(token) > MAX_TOKEN_CHARS
            or not _TOKEN.fullmatch(token)
        ):
            raise LinkInvalid("this one-tap link is not valid (garbled or cut short)")
        payload, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise LinkInvalid("this one-tap link is not valid (its signature does not match)")
        try:
            body: Any = json.loads(_unb64(payload))
            sandbox = body.get("s")
            claim = Claim(
                str(body["a"]),
                str(body["w"]),
                float(body["e"]),
                str(body["n"]),
                None if sandbox is None else str(sandbox),
            )
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            # signed by us yet unreadable: only a key shared with something else could do that
            raise LinkInvalid("this one-tap link is not valid (unreadable)") from None
        if (now if now is not None else time.time()) >= claim.expires_at:
            raise LinkExpired(f"this one-tap link expired with approval {claim.approval_id}")
        return claim

    def used(self, claim: Claim) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM one_tap_nonces WHERE nonce = ?", (claim.nonce,)
            ).fetchone()
        return row is not None

    def claim(self, token: str) -> Claim:
        """Verify and use up the token (LinkInvalid, LinkExpired, or LinkUsed on a second
        use): the caller then approves `claim.approval_id` as the link's webhook."""
        claim = self.verify(token)
        now = time.time()
        try:
            with self._lock, self._conn:
                self._conn.execute(
                    "INSERT INTO one_tap_nonces (nonce, approval, webhook, expires_at, used_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (claim.nonce, claim.approval_id, claim.webhook, claim.expires_at, now),
                )
                self._conn.execute(
                    "DELETE FROM one_tap_nonces WHERE expires_at < ?", (now - NONCE_KEPT_S,)
                )
        except sqlite3.IntegrityError:
            raise LinkUsed(
                f"this one-tap link was already used (approval {claim.approval_id})"
            ) from None
        return claim


def console_base(config: Any) -> str:
    """Where a phone reaches the console: notify.console_url (the operator's reverse proxy),
    else the control plane's own loopback address."""
    notify = getattr(config, "notify", None)
    url = getattr(notify, "console_url", None) if notify is not None else None
    if url:
        return str(url).rstrip("/")
    control = config.control
    host = f"[{control.host}]" if ":" in control.host else control.host
    # `port: null` (socket only): no console a phone could reach; set notify.console_url
    return f"http://{host}" + (f":{control.port}" if control.port is not None else "")


def approval_link(config: Any, approval_id: str, token: str | None = None) -> str:
    """The console's page for one approval, or with `token` its one-tap confirmation page."""
    base = console_base(config)
    if token is not None:
        return f"{base}/one-tap/{token}"
    return f"{base}/approvals#a-{approval_id}"
