"""Pending approvals for unknown hosts: held requests wait here until an operator decides."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox.policy import Endpoint
from sandbox.proxy.options import DEFAULT_MAX_PENDING
from sandbox.proxy.ports import AuditSink, PolicyWriter


def approval_endpoint(host: object, port: object) -> Endpoint:
    """What an approval may persist: one concrete host and one port, nothing wider (no wildcard,
    no private or numeric host, no allow_private, default access). ValueError says why not."""
    from sandbox.proxy.addresses import ip_literal, is_forbidden

    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"an approval names one port, 1-65535 (not {port!r})")
    if not isinstance(host, str):
        raise ValueError(f"an approval names one host (not {host!r})")
    if "*" in host:
        raise ValueError(f"an approval names one host, not a wildcard ({host!r})")
    try:
        endpoint = Endpoint(host=host, ports=[port])
    except ValueError:
        raise ValueError(f"an approval names one host name or address (not {host!r})") from None
    literal = ip_literal(endpoint.host)
    if literal is not None and is_forbidden(literal):
        raise ValueError(f"an approval cannot name a private address ({host!r})")
    if literal is None and endpoint.host.rsplit(".", 1)[-1].isdigit():
        # `127.1`, `2130706433`: not a name but an address the resolver reads its own way
        raise ValueError(f"an approval cannot name a numeric host ({host!r})")
    return endpoint


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reason: str
    persisted: bool = False


# The control plane denies a request when its policy's hold_seconds have passed (its expirer,
# appliance/control/approvals.py); the proxy refuses on its own only this much later, for when
# no control plane is there to do it.
BACKSTOP_GRACE_S = 5.0
DEFAULT_HOLD_S = 30.0  # sandbox.policy's default hold_seconds
MAX_SHOWN_PATH = 256  # characters of a held request's path shown to the operator


def shown_path(path: str | None) -> str | None:
    """The path as the operator sees it: without its query (it may carry a secret), cut short."""
    if path is None:
        return None
    bare = path.split("?", 1)[0]
    return bare if len(bare) <= MAX_SHOWN_PATH else bare[: MAX_SHOWN_PATH - 1] + "…"


@dataclass
class Pending:
    id: str
    sandbox: str
    host: str
    port: int
    created: float
    future: asyncio.Future[Verdict] = field(repr=False)
    waiters: int = 0
    # created + the policy's hold_seconds when it was held: the control plane denies it then
    expires: float = 0.0
    # the first request held for this host (later identical ones share the entry); for a
    # CONNECT tunnel only the method is known (the path is inside the tunnel)
    method: str | None = None
    path: str | None = None

    @property
    def hold_seconds(self) -> float:
        return self.expires - self.created

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sandbox": self.sandbox,
            "host": self.host,
            "port": self.port,
            "created": self.created,
            "expires": self.expires,
            "method": self.method,
            "path": self.path,
            "waiters": self.waiters,
        }


class TooManyPending(Exception):
    """A sandbox asked for more approvals at once than the operator allows: refused at once."""


class ApprovalBroker:
    """In-memory, one event loop. Identical requests share one entry; waiters wake at once.

    At most `max_pending` entries per sandbox: a sandbox that asks for more (one opened 59 in
    3 s) is refused at once instead of flooding the operator's queue."""

    def __init__(
        self,
        writer: PolicyWriter | None = None,
        audit: AuditSink | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        backstop_grace_s: float = BACKSTOP_GRACE_S,
    ) -> None:
        self._writer = writer
        self._audit = audit
        self._pending: dict[str, Pending] = {}
        self.max_pending = max_pending
        self.backstop_grace_s = backstop_grace_s

    def request(
        self,
        sandbox: str,
        host: str,
        port: int,
        *,
        hold_seconds: float = DEFAULT_HOLD_S,
        method: str | None = None,
        path: str | None = None,
    ) -> Pending:
        """The pending entry for this host (shared), a new one, or TooManyPending. A new one
        expires `hold_seconds` from now."""
        mine = 0
        for pending in self._pending.values():
            if (pending.sandbox, pending.host, pending.port) == (sandbox, host, port):
                return pending
            mine += pending.sandbox == sandbox
        if mine >= self.max_pending:
            raise TooManyPending(
                f"{sandbox} already has {mine} pending approvals (the most allowed: "
                f"sandbox.max_pending_approvals = {self.max_pending}); {host}:{port} is refused "
                "until the operator decides some (appliance approvals list)"
            )
        now = time.time()
        pending = Pending(
            id=secrets.token_hex(4),
            sandbox=sandbox,
            host=host,
            port=port,
            created=now,
            future=asyncio.get_running_loop().create_future(),
            expires=now + hold_seconds,
            method=method,
            path=shown_path(path),
        )
        self._pending[pending.id] = pending
        return pending

    async def wait(self, pending: Pending, timeout: float | None = None) -> Verdict:
        """The verdict (the operator's, or the control plane's expiry), or the proxy's own
        refusal after `timeout` seconds: by default the backstop, `backstop_grace_s` past the
        entry's expiry."""
        if timeout is None:
            timeout = max(0.0, pending.expires + self.backstop_grace_s - time.time())
        pending.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(pending.future)
        except TimeoutError:
            verdict = Verdict(
                False,
                f"approval for {pending.host}:{pending.port} timed out "
                f"(not answered within {pending.hold_seconds:g}s)",
            )
            if pending.waiters == 1:  # the last one waiting: the entry is stale now
                self._settle(pending, verdict)
            return verdict
        finally:
            pending.waiters -= 1

    def list_pending(self) -> list[Pending]:
        return sorted(self._pending.values(), key=lambda p: p.created)

    def get(self, approval_id: str) -> Pending:
        try:
            return self._pending[approval_id]
        except KeyError:
            raise KeyError(f"no pending approval {approval_id!r}") from None

    async def approve(self, approval_id: str, persist: bool = False) -> Pending:
        """Release the waiters; with `persist`, first have the control plane write a revision."""
        pending = self.get(approval_id)
        if persist and self._writer is not None:
            endpoint = approval_endpoint(pending.host, pending.port)
            result = self._writer.persist_allow(pending.sandbox, endpoint)
            if inspect.isawaitable(result):
                await result
        persisted = persist and self._writer is not None
        self._settle(pending, Verdict(True, "approved by operator", persisted))
        self._emit("egress.approved", pending, persist=persisted)
        return pending

    def deny(self, approval_id: str, reason: str = "denied by operator") -> Pending:
        pending = self.get(approval_id)
        self._settle(pending, Verdict(False, reason))
        self._emit("egress.rejected", pending, reason=reason)
        return pending

    def _settle(self, pending: Pending, verdict: Verdict) -> None:
        self._pending.pop(pending.id, None)
        with contextlib.suppress(asyncio.InvalidStateError):
            pending.future.set_result(verdict)

    def _emit(self, event: str, pending: Pending, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.audit(
                event, sandbox=pending.sandbox, host=pending.host, port=pending.port,
                approval=pending.id, **fields,
            )  # fmt: skip
