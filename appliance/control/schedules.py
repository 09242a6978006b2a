"""What the scheduler and the liveness thread read: each agent's current deployment's blueprint
(cached per deployment: a tick every few seconds must not re-read the catalog; one that cannot
be resolved is tried again after RETRY_S), and the view of an agent's schedule that
`GET /agents/{name}/schedule` answers with."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import ApplianceConfig
from appliance.control.scheduler import Entry
from appliance.errors import ApplianceError, NotFoundError
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.schedule_store import EntryState, read_states
from blueprints.model import Blueprint
from sandbox.names import check_name

if TYPE_CHECKING:
    from appliance.control.agent_manager import AgentManager
    from appliance.store.agent_store import Deployment

log = logging.getLogger(__name__)

RETRY_S = 60.0  # an unresolvable blueprint (its catalog file missing or edited) is tried again


@dataclass(frozen=True)
class _Resolved:
    blueprint: Blueprint | None  # None: it could not be resolved
    error: str | None = None
    retry_at: float | None = None  # monotonic; None: resolved, for the deployment's lifetime


class DeployedBlueprints:
    """Each agent's current deployment's blueprint, as deployed (pinned to its digest)."""

    def __init__(
        self, config: ApplianceConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self._cache: dict[int, _Resolved] = {}  # by deployment id
        self._lock = threading.Lock()

    def current(self) -> dict[str, Blueprint | None]:
        """agent -> its blueprint, for every agent (None: the blueprint cannot be resolved any
        more, e.g. its catalog file was edited in place; the agent still exists and runs)."""
        from appliance.control.agent_manager import AgentManager
        from appliance.control.wiring import sandbox_manager

        found: dict[str, Blueprint | None] = {}
        with open_store(self.config.state_dir) as store:
            agents = AgentStore(store)
            deployments = [d for a in agents.agents() if (d := agents.current(a)) is not None]
            manager: AgentManager | None = None
            with self._lock:
                for dep in deployments:
                    cached = self._cache.get(dep.id)
                    if cached is None or (
                        cached.retry_at is not None and self.clock() >= cached.retry_at
                    ):
                        if manager is None:
                            manager = AgentManager(
                                self.config, store, sandbox_manager(self.config, store)
                            )
                        self._cache[dep.id] = cached = self._resolve(manager, dep, cached)
                    found[dep.agent] = cached.blueprint
                live = {d.id for d in deployments}
                self._cache = {i: r for i, r in self._cache.items() if i in live}
        return found

    def _resolve(
        self, manager: AgentManager, dep: Deployment, before: _Resolved | None
    ) -> _Resolved:
        """The deployment's blueprint, or the failure to try again after RETRY_S (its catalog
        file may come back: a failure is not cached for good)."""
        try:
            bp = manager.deployed(dep, pinned=True)
        except Exception as exc:  # the catalog lost or changed it: said when it changes
            error = str(exc) or type(exc).__name__
            if before is None or before.error != error:
                log.warning("agent %s: its blueprint %s: %s", dep.agent, dep.ref, error)
            return _Resolved(None, error, self.clock() + RETRY_S)
        if before is not None:
            log.info("agent %s: its blueprint %s resolves again", dep.agent, dep.ref)
        return _Resolved(bp)

    def entries(self) -> list[Entry]:
        """Every agent's schedule entries, by agent."""
        return [
            Entry(agent, index, spec)
            for agent, bp in sorted(self.current().items())
            if bp is not None
            for index, spec in enumerate(bp.schedule)
        ]


def schedule_view(entries: list[Entry], states: list[EntryState]) -> list[dict[str, Any]]:
    """Each entry with its next and last run (None where the scheduler has not planned it yet:
    the control plane is not running, or has not ticked since the agent was made)."""
    by_key = {s.entry_key: s for s in states}
    rows = []
    for entry in entries:
        state = by_key.get(entry.key)
        rows.append(
            {
                **entry.describe(),
                "next_run_at": state.next_run_at if state else None,
                "last_run_at": state.last_run_at if state else None,
                "last_outcome": state.last_outcome if state else None,
                "last_reason": state.last_reason if state else None,
                "last_skip_at": state.last_skip_at if state else None,
                "last_skip_reason": state.last_skip_reason if state else None,
                "runs": state.runs if state else 0,
                "skips": state.skips if state else 0,
            }
        )
    return rows


class ScheduleService:
    """`GET /agents/{name}/schedule`: read-only."""

    def __init__(self, config: ApplianceConfig, deployed: DeployedBlueprints) -> None:
        self.config = config
        self.deployed = deployed

    def view(self, name: str) -> list[dict[str, Any]]:
        check_name(name, "agent")
        agents = self.deployed.current()
        if name not in agents:
            raise NotFoundError(f"no agent named {name!r}", hint="`appliance agent list`")
        bp = agents[name]
        if bp is None:
            raise ApplianceError(
                f"agent {name}'s blueprint cannot be resolved, so neither can its schedule",
                hint="see control.log in the state directory; `appliance agent upgrade` fixes it",
            )
        entries = [Entry(name, i, spec) for i, spec in enumerate(bp.schedule)]
        with open_store(self.config.state_dir) as store:
            return schedule_view(entries, read_states(store.conn, name))
