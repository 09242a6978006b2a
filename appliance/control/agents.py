"""Agents as the control plane owns them: every change goes through here, one name at a time.

A change (create, stop, start, rm, upgrade, rollback) holds the agent's lock and then its
sandbox's (the same lock `sandbox create NAME` takes: an agent and a plain sandbox cannot race
for one name), on its own store connection (AgentManager over the sandbox service's manager). A
second create of a name that exists is a ConflictError (409), never a half-made agent. The
image a blueprint pins is found or built first, under the agent's lock only: a build takes
minutes and must not hold the sandboxes' lock (reconciliation waits on it) meanwhile.

Turns are the plane's TurnService's (turns.py): they take no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from appliance.control.agent_manager import AgentManager, BlueprintSource, deployment_view
from appliance.control.blueprints import check_ref, parse
from appliance.errors import NotFoundError
from appliance.store import open_store
from blueprints.model import Blueprint
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
        """The agent's lock (an RLock, as all the plane's), taken once per call around
        `_guarded`: the agent's, then the sandbox's, always in that order."""
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

    # -- changes -----------------------------------------------------------------------------

    def create(self, who: Principal, name: str, source: BlueprintSource) -> dict[str, Any]:
        """From a catalog reference or a blueprint parsed from a client's text (`blueprint`)."""
        check_name(name, "agent")
        source = checked(source)
        with self._locked(name):
            with self._manager(who) as m:
                m.refuse_existing(name)  # the common conflict, answered before any build
                blueprint = m.blueprint(source)
            self._prepare_image(who, blueprint)
            with self._guarded(who, name) as m:
                dep = m.create(name, blueprint, progress=_progress)  # checks the name, locked
                return {**deployment_view(dep), "enforcement": m.sandboxes.enforcement(name) or {}}

    def stop(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.stop(name)
        self.plane.turns.interrupt([name], "the agent was stopped")  # not left waiting 120 s
        return self.get(name)

    def start(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.start(name)
        return self.get(name)

    def remove(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name), self._guarded(who, name) as m:
            m.remove(name)
        self.plane.turns.interrupt([name], "the agent was removed")
        return {"name": name, "removed": True}

    def upgrade(self, who: Principal, name: str, to: BlueprintSource | None) -> dict[str, Any]:
        """To VERSION, NAME@VERSION or a parsed blueprint (default: the newest version)."""
        to = checked(to) if to else None
        with self._locked(name):
            with self._manager(who) as m:
                target = m.upgrade_target(name, to)
            self._prepare_image(who, target)
            with self._guarded(who, name) as m:
                return deployment_view(m.upgrade(name, target, progress=_progress))

    def rollback(self, who: Principal, name: str) -> dict[str, Any]:
        with self._locked(name):
            with self._manager(who) as m:
                target = m.rollback_target(name)
            self._prepare_image(who, target)
            with self._guarded(who, name) as m:
                return deployment_view(m.rollback(name, progress=_progress))

    def get(self, name: str) -> dict[str, Any]:
        for row in self.list():
            if row["name"] == name:
                return row
        raise NotFoundError(f"no agent named {name!r}", hint="`appliance agent list`")


def checked(source: BlueprintSource) -> BlueprintSource:
    """A reference that is no path (the control plane never opens a caller's path), or a
    blueprint already parsed from text."""
    return source if isinstance(source, Blueprint) else check_ref(source)


def blueprint_source(ref: str | None, text: str | None, source: str) -> BlueprintSource | None:
    """What a request names: a catalog reference, or a blueprint's YAML text (parsed here;
    `source`, the client's file name, only labels its error lines)."""
    if text is not None:
        return parse(text, source)
    return check_ref(ref) if ref else None


def _progress(line: str) -> None:
    log.info("%s", line)
