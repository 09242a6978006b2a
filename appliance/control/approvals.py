"""Egress approvals across every sandbox's proxy: list, approve (optionally persisted), deny.

The proxies hold the pending requests (in memory, behind their admin sockets); the decision is
the control plane's. Decisions on one approval id are serialised by the plane's per-id lock and
remembered in the store (appliance/store/approval_store.py), so of ten operators approving one
request at once exactly one wins and the others get a ConflictError (409) naming the decision,
not a second approval nor a 404; after a restart of the control plane too, though the proxy
forgot the request once decided. An id no proxy holds and none decided is a NotFoundError (404).

Expiry is decided here too: each pending entry carries `expires` (held + its policy's
hold_seconds); the plane's expirer thread (`run_expirer`, every EXPIRE_EVERY_S) denies the ones
past it under the same per-id lock, records the decision "expired" (a later approve is a 409
"already expired") and audits `approval.expired`. The proxy's own timeout is only a backstop a
few seconds later, for when no control plane is running.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from appliance.errors import ConflictError, NotFoundError
from appliance.store.approval_store import ApprovalDecisions

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane
    from sandbox.lifecycle.manager import SandboxManager
    from sandbox.proxy.admin_client import AdminClient

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 5.0  # per proxy: a wedged proxy fails its own sandbox's listing, not all
EXPIRE_EVERY_S = 0.5  # how often the expirer looks: an expiry is late by at most this much
EXPIRER = "expirer"  # the actor of an expiry (kind "system": no request behind it)
HISTORY_MAX = 1000
_ID = re.compile(r"[0-9a-f]{1,64}")  # the proxies' ids are hex (secrets.token_hex)


@contextmanager
def admin_clients(m: SandboxManager) -> Iterator[dict[str, AdminClient]]:
    """Each sandbox's proxy admin client (sandboxes whose proxy has a socket), closed after."""
    from sandbox.proxy.admin_client import AdminClient

    clients = {
        r.name: AdminClient(m.paths(r.name).admin_socket, timeout=ADMIN_TIMEOUT_S)
        for r in m.boxes.list()
        if m.paths(r.name).admin_socket.exists()
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def _pending(name: str, client: AdminClient, level: int = logging.WARNING) -> list[dict[str, Any]]:
    try:
        return client.list()
    except Exception as exc:  # a proxy that died or hangs: its sandbox shows none, others do
        log.log(level, "approvals of %s unreadable: %s", name, exc)
        return []


class ApprovalService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.decisions = ApprovalDecisions(plane.config.state_dir)

    def close(self) -> None:
        self.decisions.close()

    def list(self) -> list[dict[str, Any]]:
        """Every proxy's pending entries, each with its age and the seconds left before it
        expires (where the proxy says when)."""
        with self.plane.sandboxes.manager(ready=False) as m, admin_clients(m) as clients:
            pending = [p for name, client in clients.items() for p in _pending(name, client)]
        now = time.time()
        for entry in pending:
            entry["age_s"] = round(max(0.0, now - entry["created"]), 1)
            if entry.get("expires"):
                entry["expires_in_s"] = round(max(0.0, entry["expires"] - now), 1)
        return pending

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Decisions taken, newest first (approved, denied, expired; who, when)."""
        return self.decisions.recent(max(1, min(limit, HISTORY_MAX)))

    # -- expiry --------------------------------------------------------------------------------

    def run_expirer(self, stop: threading.Event) -> None:
        """The plane's expirer thread: deny what is past its expiry until `stop` is set."""
        last_failure = ""
        while not stop.wait(EXPIRE_EVERY_S):
            try:
                self.expire_due()
                last_failure = ""
            except Exception as exc:  # the next tick tries again: the thread must not end
                if repr(exc) != last_failure:  # logged once, not twice a second
                    log.exception("approval expiry pass failed")
                last_failure = repr(exc)

    def expire_due(self, now: float | None = None) -> list[dict[str, Any]]:
        """Deny every pending entry whose `expires` has passed; the expiries recorded."""
        now = time.time() if now is None else now
        expired: list[dict[str, Any]] = []
        with self.plane.sandboxes.manager(ready=False) as m, admin_clients(m) as clients:
            for name, client in clients.items():
                # twice a second: a dead proxy is the reconciler's to report, not a log flood
                for entry in _pending(name, client, logging.DEBUG):
                    due = entry.get("expires")
                    if (
                        isinstance(due, (int, float))
                        and 0 < due <= now
                        and _ID.fullmatch(str(entry.get("id", "")))
                    ):
                        done = self._expire(m, name, client, entry, now)
                        if done is not None:
                            expired.append(done)
        return expired

    def _expire(
        self,
        m: SandboxManager,
        name: str,
        client: AdminClient,
        entry: dict[str, Any],
        now: float,
    ) -> dict[str, Any] | None:
        approval_id = entry["id"]
        with self.plane.locked("approval", approval_id):
            if self.decisions.get(approval_id) is not None:
                return None  # an operator decided it while this pass was listing
            hold_s = max(0.0, float(entry["expires"]) - float(entry["created"]))
            try:
                client.deny(approval_id, reason=f"expired: not answered within {hold_s:g}s")
            except KeyError:
                return None  # settled meanwhile (an approve being remembered, the backstop)
            except Exception as exc:  # a wedged proxy: tried again on the next tick
                log.warning("expiring approval %s of %s failed: %s", approval_id, name, exc)
                return None
            decided = {
                "id": approval_id,
                "sandbox": name,
                "host": entry["host"],
                "port": entry["port"],
                "decision": "expired",
                "persisted": False,
                "rev": None,
            }
            self._remember(EXPIRER, decided)
            m.store_audit(
                "approval.expired",
                approval=approval_id,
                sandbox=name,
                host=entry["host"],
                port=entry["port"],
                method=entry.get("method"),
                waited_s=round(max(0.0, now - float(entry["created"])), 1),
                actor=EXPIRER,
                actor_kind="system",
            )
            return decided

    def approve(
        self, who: Principal, approval_id: str, persist: bool, sandbox: str | None = None
    ) -> dict[str, Any]:
        """Approve `approval_id`; with `sandbox`, only if that sandbox's proxy holds it (a
        one-tap link names its sandbox: ids are random per proxy, another may hold the same)."""
        return self._decide(who, approval_id, approve=True, persist=persist, sandbox=sandbox)

    def deny(self, who: Principal, approval_id: str) -> dict[str, Any]:
        return self._decide(who, approval_id, approve=False, persist=False)

    def _decide(
        self,
        who: Principal,
        approval_id: str,
        approve: bool,
        persist: bool,
        sandbox: str | None = None,
    ) -> dict[str, Any]:
        of = f" of sandbox {sandbox}" if sandbox is not None else ""
        unknown = NotFoundError(
            f"no pending approval {approval_id!r}{of}", hint="`appliance approvals list`"
        )
        if not _ID.fullmatch(approval_id):
            raise unknown
        with self.plane.locked("approval", approval_id):
            self._refuse_if_decided(approval_id)
            with self.plane.sandboxes.manager(ready=False) as m, admin_clients(m) as clients:
                for name, client in clients.items():
                    if sandbox is not None and name != sandbox:
                        continue
                    shown = [p for p in _pending(name, client) if p["id"] == approval_id]
                    if shown:
                        decided = self._apply(m, who, name, client, shown[0], approve, persist)
                        self._remember(who.name, decided)
                        return decided
            raise unknown

    def _apply(
        self,
        m: SandboxManager,
        who: Principal,
        name: str,
        client: AdminClient,
        pending: dict[str, Any],
        approve: bool,
        persist: bool,
    ) -> dict[str, Any]:
        approval_id = pending["id"]
        rev: int | None = None
        try:
            if not approve:
                client.deny(approval_id)
            elif persist:  # the control plane writes the rule, on this command: never the proxy
                endpoint = m.persistable(approval_id, pending["host"], pending["port"])
                # The rule first: a rule that cannot be written lets nothing through unaudited.
                with self.plane.sandboxes.guarded(name) as locked:
                    rev = locked.persist_approval(name, endpoint, approval_id)
                client.approve(approval_id)
            else:
                client.approve(approval_id)
        except KeyError:  # the proxy settled it meanwhile (its hold timed out)
            written = f"; its rule was written (rev {rev})" if rev is not None else ""
            raise NotFoundError(
                f"no pending approval {approval_id!r} (it timed out{written})",
                hint="`appliance approvals list`",
            ) from None
        decision = "approved" if approve else "denied"
        m.store_audit(
            f"control.approval.{decision}",
            approval=approval_id,
            sandbox=name,
            persist=persist,
            rev=rev,
            **who.audit_fields(),
        )
        return {
            "id": approval_id,
            "sandbox": name,
            "host": pending["host"],
            "port": pending["port"],
            "decision": decision,
            "persisted": rev is not None,
            "rev": rev,
        }

    def _refuse_if_decided(self, approval_id: str) -> None:
        earlier = self.decisions.get(approval_id)
        if earlier is not None:
            where = f"{earlier['sandbox']}, {earlier['host']}:{earlier['port']}"
            raise ConflictError(
                f"approval {approval_id} was already {earlier['decision']} ({where}) "
                f"by {earlier['actor']}",
                hint="`appliance approvals list` shows what is still pending",
            )

    def _remember(self, actor: str, decided: dict[str, Any]) -> None:
        try:
            self.decisions.record(decided, actor)
        except sqlite3.Error as exc:
            # The decision stands (the proxy has it, the audit log records it): failing the call
            # now would tell the operator it did not happen. Only a later repeat's 409 is lost.
            log.warning("decision on approval %s not remembered: %s", decided["id"], exc)
