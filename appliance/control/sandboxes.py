"""Sandboxes as the control plane owns them: every change goes through here, one name at a time.

Each call opens its own store and SandboxManager (SQLite connections and podman-py sessions are
not shared between the API's worker threads). Two calls on one name are serialised by the
plane's per-name lock, so the second sees the first's result: a create of a name that exists is a
ConflictError (409), never a second half-made sandbox. Reconciliation takes the whole set
exclusively (`_Gate`): it never sees a sandbox mid-create (a `creating` record without its
container would otherwise be marked missing and lose its proxy).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, ConfigError, ConflictError, NotFoundError
from appliance.store import open_store
from sandbox.names import check_name
from sandbox.policy import Policy, parse_policy
from sandbox.yamlfile import YamlError

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane
    from sandbox.lifecycle.manager import SandboxManager

log = logging.getLogger(__name__)

EXEC_TIMEOUT_S = 600.0
EXEC_OUTPUT_CAP = 8 << 20  # bytes of stdout, and of stderr, an exec returns (base64 on the wire)
LOGS_TAIL = 1000  # lines of a sandbox's logs returned unless the caller asks for more or fewer
LOGS_TAIL_MAX = 100_000
LOGS_BYTES_MAX = 8 << 20
RECONCILE_INTERVAL_S = 30.0


class _Gate:
    """Many per-name operations at once, or one reconciliation alone (a readers-writer lock).
    A thread already inside may enter again (an agent's service nests its sandbox's calls): it
    never waits for a reconciliation that waits for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._mine = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        with self._cond:
            if depth == 0:
                self._cond.wait_for(lambda: not self._exclusive)
            self._active += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True  # new shared holders wait from here on
            self._cond.wait_for(lambda: self._active == 0)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def policy_from_text(text: str, source: str) -> Policy:
    """The policy a client sent (it parsed the file first; this checks again): ConfigError
    naming `source`:line for a bad one."""
    try:
        return parse_policy(text, source)
    except YamlError as exc:
        raise ConfigError(str(exc), hint="fix the policy file at the line named") from None


class SandboxService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.config = plane.config
        self._gate = _Gate()

    # -- building blocks (also for the plane's other services: agents, approvals, kill switch) --

    @contextmanager
    def manager(self, ready: bool = True) -> Iterator[SandboxManager]:
        """A manager on its own store connection (for this thread, for this call)."""
        from appliance.control.wiring import ensure_ready, opened_manager

        if ready:
            ensure_ready(self.config)
        with opened_manager(self.config) as m:
            yield m

    @contextmanager
    def guarded(self, name: str) -> Iterator[SandboxManager]:
        """The manager, holding `name`'s lock (and keeping reconciliation out meanwhile). The
        name is checked first: no lock is made for a name that cannot exist."""
        check_name(name, "sandbox")
        with self._gate.shared(), self.plane.locked("sandbox", name), self.manager() as m:
            yield m

    def _audit(self, m: SandboxManager, event: str, who: Principal | None, **fields: Any) -> None:
        m.store_audit(event, **fields, **(who.audit_fields() if who is not None else {}))

    # -- reads -------------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        with self.manager() as m:
            return m.list()

    def get(self, name: str) -> dict[str, Any]:
        for row in self.list():
            if row["name"] == name:
                return row
        raise NotFoundError(f"no sandbox named {name!r}", hint="`appliance sandbox list`")

    def policy(self, name: str) -> dict[str, Any]:
        with self.manager() as m:
            rev, policy = m.policy(name)
        return {"rev": rev, "policy": policy.model_dump(mode="json")}

    def logs(self, name: str, tail: int = LOGS_TAIL) -> str:
        """The last `tail` lines of the sandbox's output (never all of it: it is unbounded), and
        of those at most the last LOGS_BYTES_MAX bytes (a line may be any length)."""
        kept = bytearray()
        with self.manager() as m:
            container = m.container(name)
            frames = container.logs(stdout=True, stderr=True, tail=tail, stream=True, follow=False)
            for frame in frames:
                kept += frame
                if len(kept) > 2 * LOGS_BYTES_MAX:
                    del kept[:-LOGS_BYTES_MAX]
        return bytes(kept[-LOGS_BYTES_MAX:]).decode(errors="replace")

    # -- changes -----------------------------------------------------------------------------

    def create(
        self,
        who: Principal,
        name: str,
        policy_text: str,
        source: str,
        command: list[str] | None,
        image: str | None,
    ) -> dict[str, Any]:
        check_name(name, "sandbox")  # before anything is read, opened or written
        policy = policy_from_text(policy_text, source)
        with self.guarded(name) as m:
            if m.boxes.get(name) is not None:
                raise ConflictError(
                    f"sandbox {name!r} exists", hint=f"`appliance sandbox rm {name}` first"
                )
            try:
                record = m.create(name, policy, command or None, image)
            except Exception as exc:
                self._refuse_if_held_meanwhile(m, name, failed=exc)
                raise
            self._audit(m, "control.sandbox.create", who, sandbox=name)
            self._refuse_if_held_meanwhile(m, name)
            return {"name": record.name, "state": record.state, "enforcement": m.enforcement(name)}

    @staticmethod
    def _refuse_if_held_meanwhile(
        m: SandboxManager, name: str, failed: Exception | None = None
    ) -> None:
        """The kill switch takes no name lock (it must finish within 5 s): pulled with --hold
        while this sandbox was being created or started, it may have found nothing to stop yet.
        Held now: stop what was just started, and say so (fail closed). A create the switch
        broke (it stopped the container under it, and the create undid itself) is the same
        conflict, not whatever error the broken step raised."""
        held = m.boxes.held()
        if held is None:
            return
        if failed is not None:
            raise ConflictError(
                f"sandbox {name!r} was not made: the kill switch held while it started ({held});"
                f" the create failed: {failed}",
                hint="`appliance release` lifts the hold; then create it again",
            ) from failed
        m.kill([name], False, reason=f"the kill switch held while it started: {held}")
        raise ConflictError(
            f"sandbox {name!r} was stopped as it started: the kill switch holds ({held})",
            hint="`appliance release` lifts the hold; then `appliance sandbox start`",
        )

    def set_policy(self, who: Principal, name: str, policy_text: str, source: str) -> int:
        policy = policy_from_text(policy_text, source)
        with self.guarded(name) as m:
            rev = m.set_policy(name, policy)
            self._audit(m, "control.sandbox.policy", who, sandbox=name, rev=rev)
            return rev

    def _act(self, who: Principal, name: str, event: str, act: Callable[[Any], None]) -> None:
        with self.guarded(name) as m:
            act(m)
            self._audit(m, event, who, sandbox=name)

    def stop(self, who: Principal, name: str) -> dict[str, Any]:
        self._act(who, name, "control.sandbox.stop", lambda m: m.stop(name))
        return self.get(name)

    def start(self, who: Principal, name: str) -> dict[str, Any]:
        def start(m: SandboxManager) -> None:
            m.start(name)
            self._refuse_if_held_meanwhile(m, name)

        self._act(who, name, "control.sandbox.start", start)
        return self.get(name)

    def remove(self, who: Principal, name: str, keep_home: bool) -> dict[str, Any]:
        self._act(who, name, "control.sandbox.rm", lambda m: m.remove(name, keep_home=keep_home))
        return {"name": name, "removed": True}

    def exec(self, name: str, argv: list[str], stdin: bytes) -> dict[str, Any]:
        """`argv` in the sandbox as the agent, `stdin` fed whole; output whole (base64), not
        streamed: an interactive session is not what this API offers. Each stream is capped
        at EXEC_OUTPUT_CAP: past it the command is stopped and `truncated` is true."""
        from sandbox.lifecycle.exec import exec_argv, run_capped, stop_marked

        if not argv:
            raise ConfigError("exec needs a command", hint="`appliance sandbox exec NAME -- CMD`")
        mark = secrets.token_hex(16)
        with self.manager() as m:
            podman_argv = exec_argv(m, name, argv, mark)
        done = run_capped(podman_argv, stdin, EXEC_OUTPUT_CAP, EXEC_TIMEOUT_S)
        if done.truncated or done.timed_out:  # the client is stopped; its session is not
            stop_marked(mark)
        if done.timed_out:
            raise ApplianceError(
                f"{argv[0]} ran past {EXEC_TIMEOUT_S:.0f} s and was stopped",
                hint="run long commands as the sandbox's own command, not through exec",
            )
        return {
            "exit_code": done.exit_code,
            "stdout": base64.b64encode(done.stdout).decode(),
            "stderr": base64.b64encode(done.stderr).decode(),
            "truncated": done.truncated,
        }

    def reconcile(self, who: Principal | None = None) -> dict[str, list[str]]:
        """Match the store with Podman (the plane's thread every 30 s, or an operator now)."""
        with self._gate.exclusive(), self.manager() as m:
            out = m.reconcile().as_dict()
            if who is not None:
                self._audit(m, "control.sandbox.reconcile", who)
            return out

    def reconcile_if_any(self) -> dict[str, list[str]] | None:
        """The periodic run: None where there is nothing to reconcile (not root, no sandbox
        recorded), so a host without sandboxes never starts a Podman service for it."""
        from appliance.store.sandbox_store import SandboxStore

        if os.geteuid() != 0:  # sandboxes are root's to manage; a user's control plane has none
            return None
        with open_store(self.config.state_dir) as store:
            if not SandboxStore(store).list():
                return None
        return self.reconcile()


def reconcile_forever(service: SandboxService, stop: threading.Event) -> None:
    """The control plane's reconciler (its own thread, started by `serve control`): now, then
    every RECONCILE_INTERVAL_S until `stop`; never raises. The only one (the supervisor does not
    reconcile, and control.lock allows one control plane), so no two reconcilers race."""
    while True:
        try:
            out = service.reconcile_if_any()
            if out and any(out[k] for k in ("proxies_restarted", "restarted", "failed", "orphans")):
                log.warning("sandboxes reconciled: %s", out)
        except Exception as exc:  # Podman down, store locked: try again next round
            log.warning("sandbox reconciliation failed: %s", exc)
        if stop.wait(RECONCILE_INTERVAL_S):
            return
