"""Agents as the control plane owns them: every change goes through here, one name at a time.

A change (create, stop, start, rm, upgrade, rollback) holds the agent's lock and then its
sandbox's (the same lock `sandbox create NAME` takes: an agent and a plain sandbox cannot race
for one name), on its own store connection (AgentManager over the sandbox service's manager). A
second create of a name that exists is a ConflictError (409), never a half-made agent. The
image a blueprint pins is found or built first, under the agent's lock only: a build takes
minutes and must not hold the sandboxes' lock (reconciliation waits on it) meanwhile.

A turn takes no lock: it can run for minutes with a real model, and `agent stop` or the kill
switch must not wait for it (a turn cut off that way fails with the exec's error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from appliance.control.agent_manager import AgentManager, deployment_view
from appliance.errors import AuthError, ConfigError, NotFoundError
from appliance.store import open_store
from blueprints.model import Blueprint
from blueprints.resolve import is_path_ref
from sandbox.names import check_name

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane

log = logging.getLogger("appliance.control.agents")


class AgentService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.config = plane.config

    @contextmanager
    def _manager(self, who: Principal | None = None) -> Iterator[AgentManager]:
        """A manager on its own store connection (for this thread, for this call)."""
        actor = who.audit_fields() if who is not None else None
        with self.plane.sandboxes.manager() as sandboxes, open_store(self.config.state_dir) as db:
            yield AgentManager(self.config, db, sandboxes, actor)

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """The agent's lock (not reentrant: taken once per call, around `_guarded`)."""
        check_name(name, "agent")  # before anything is locked, read or written
        with self.plane.locked("agent", name):
            yield

    @contextmanager
    def _guarded(self, who: Principal, name: str) -> Iterator[AgentManager]:
        """The manager, holding the sandbox's lock too (the caller holds the agent's)."""
        with (
            self.plane.sandboxes.guarded(name) as sandboxes,
            open_store(self.config.state_dir) as db,
        ):
            yield AgentManager(self.config, db, sandboxes, who.audit_fields())

    def _prepare_image(self, who: Principal, blueprint: Blueprint) -> None:
        """Find or build the pinned image before the sandbox lock is taken (see the module)."""
        with self._manager(who) as m:
            m.image(blueprint, _progress)

    # -- reads -------------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        with self._manager() as m:
            return m.inventory()

    def transcript(self, name: str) -> list[dict[str, Any]]:
        check_name(name, "agent")  # the name is a path component on the host
        with self._manager() as m:
            return m.transcript(name)

    # -- changes -----------------------------------------------------------------------------

    def create(self, who: Principal, name: str, ref: str) -> dict[str, Any]:
        check_name(name, "agent")
        ref = blueprint_ref(who, ref)
        with self._locked(name):
            with self._manager(who) as m:
                m.refuse_existing(name)  # the common conflict, answered before any build
                blueprint = m.blueprint(ref)
            self._prepare_image(who, blueprint)
            with self._guarded(who, name) as m:
                dep = m.create(name, ref, progress=_progress)  # checks the name again, locked
                return {**deployment_view(dep), "enforcement": m.sandboxes.enforcement(name) or {}}

    def stop(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.stop(name)
        return self.get(name)

    def start(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.start(name)
        return self.get(name)

    def remove(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.remove(name)
        return {"name": name, "removed": True}

    def upgrade(self, who: Principal, name: str, to: str | None) -> dict[str, Any]:
        """To VERSION, NAME@VERSION or a file (default: the newest version)."""
        to = blueprint_ref(who, to) if to else None
        with self._locked(name):
            with self._manager(who) as m:
                target = m.upgrade_target(name, to)
            self._prepare_image(who, target)
            with self._guarded(who, name) as m:
                return deployment_view(m.upgrade(name, to, progress=_progress))

    def rollback(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name):
            with self._manager(who) as m:
                target = m.rollback_target(name)
            self._prepare_image(who, target)
            with self._guarded(who, name) as m:
                return deployment_view(m.rollback(name, progress=_progress))

    def run(self, who: Principal, name: str, message: str, session: str | None) -> dict[str, Any]:
        """One turn: its record, and the runtime's stderr tail (for the CLI's error line)."""
        check_name(name, "agent")
        with self._manager(who) as m:
            result = m.run(name, message, session=session)
        return {**result.as_dict(), "stderr_tail": result.stderr_tail}

    def get(self, name: str) -> dict[str, Any]:
        for row in self.list():
            if row["name"] == name:
                return row
        raise NotFoundError(f"no agent named {name!r}", hint="`appliance agent list`")


def blueprint_ref(who: Principal, ref: str) -> str:
    """A catalog reference as it is; a file path only from the unix socket (the control plane
    reads it as root, so only a local admin may name one) and only absolute (a relative one
    would be read from the control plane's own directory, not the operator's)."""
    if not is_path_ref(ref):
        return ref
    if who.kind != "unix":
        raise AuthError(
            "a blueprint file path is accepted only over the control plane's unix socket",
            hint="put the blueprint in a catalog dir (config blueprints.dirs), use NAME@VERSION",
        )
    if not os.path.isabs(ref):
        raise ConfigError(
            f"blueprint path {ref!r} is relative", hint="send an absolute path (the CLI does)"
        )
    return ref


def _progress(line: str) -> None:
    log.info("%s", line)
