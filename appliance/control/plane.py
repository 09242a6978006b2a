"""The composition root: everything the control plane owns, built once per process.

Routers get the plane from `request.app.state.plane` (api/deps.py) and call its services; no
router opens a store or builds a manager itself. Services take the acting `Principal` so every
decision is audited with who took it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from appliance.config import ApplianceConfig
from appliance.store import open_store

if TYPE_CHECKING:
    from appliance.audit import ChainWriter
    from appliance.control.agents import AgentService
    from appliance.control.approvals import ApprovalService
    from appliance.control.keys import KeyService
    from appliance.control.killswitch import KillSwitchService
    from appliance.control.liveness import Liveness
    from appliance.control.notify.service import NotifyService
    from appliance.control.one_tap import OneTap
    from appliance.control.operators import Operator, OperatorService
    from appliance.control.sandboxes import SandboxService
    from appliance.control.scheduler import Scheduler
    from appliance.control.schedules import DeployedBlueprints, ScheduleService
    from appliance.control.turns import TurnService
    from appliance.store.inference_store import InferenceStore


T = TypeVar("T")

# From the stop signal to the agents parked: the supervisor and systemd (TimeoutStopSec) send
# SIGKILL 30 s after SIGTERM. The API's graceful stop (server.py GRACEFUL_STOP_S, 5 s), the
# threads' joins (until 25 - 16 = 9 s) and the parking (liveness.PARK_NEEDS_S, 16 s at worst)
# all come out of this one budget.
SHUTDOWN_BUDGET_S = 25.0


class service(Generic[T]):  # lower case: a decorator, like functools.cached_property
    """A service built once per plane, on first use. Unlike functools.cached_property it holds
    the plane's build lock: the first requests arrive on several threads at once, and two
    ApprovalService or KillSwitchService objects would keep two sets of decisions."""

    def __init__(self, build: Callable[[Any], T]) -> None:
        self.build = build
        self.name = build.__name__
        self.__doc__ = build.__doc__

    def __get__(self, plane: Any, owner: type | None = None) -> T:
        if plane is None:
            return self  # type: ignore[return-value]
        built = plane.__dict__.get(self.name)
        if built is None:
            with plane._build_guard:  # re-entrant: a service may use another while being built
                built = plane.__dict__.get(self.name)
                if built is None:
                    built = plane.__dict__[self.name] = self.build(plane)
        return built


class ControlPlane:
    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        # Migrated (and checked) now, so a bad state dir fails before anything is served. No
        # connection is kept: each service opens its own per call or thread (SQLite connections
        # are not shared between the API's worker threads).
        open_store(config.state_dir).close()
        # One lock per named thing (sandbox, agent, approval): two clients acting on one name are
        # serialised here, so the second sees the first's result (and gets a 409), never a
        # half-made state. Different names proceed in parallel. Re-entrant: code that holds a
        # name may call code that takes the same name again in its thread (no self-deadlock).
        # Kept only while some thread holds or waits for it (a count each): names asked once
        # do not pile up for the life of the process.
        self._locks: dict[str, tuple[threading.RLock, list[int]]] = {}
        self._locks_guard = threading.Lock()
        self._build_guard = threading.RLock()
        self._threads: list[threading.Thread] = []  # start_threads
        self._stop_threads: threading.Event | None = None
        self._stop_signalled_at: float | None = None  # monotonic: the shutdown budget's start

    @contextmanager
    def locked(self, kind: str, name: str) -> Iterator[None]:
        key = f"{kind}:{name}"
        with self._locks_guard:
            lock, users = self._locks.setdefault(key, (threading.RLock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]

    # -- control-core: the audit log, operators, keys and budgets -----------------------------

    @service
    def audit_log(self) -> ChainWriter:
        """The host's hash-chained audit log (every API mutation and refusal lands here)."""
        from appliance.audit import ChainWriter, audit_path

        return ChainWriter(audit_path(self.config.state_dir))

    @service
    def operators(self) -> OperatorService:
        from appliance.control.operators import OperatorService

        return OperatorService(self.config.state_dir, self.audit_log)

    @service
    def inference(self) -> InferenceStore:
        """Keys and budgets (the gateway reads what is set here from the same store)."""
        from appliance.store.inference_store import InferenceStore

        return InferenceStore(self.config.state_dir)

    @service
    def keys(self) -> KeyService:
        from appliance.control.keys import KeyService
        from inference.gateway.routing import Router

        router = Router(self.config.gateway_settings())
        return KeyService(self.inference, lambda model: router.resolve(model) is not None)

    def authenticate_operator(self, token: str) -> Operator | None:
        """The live operator holding `token` (with .name and .role), or None."""
        return self.operators.authenticate(token)

    # -- control-sandboxes: sandboxes, approvals, the kill switch -----------------------------

    @service
    def sandboxes(self) -> SandboxService:
        from appliance.control.sandboxes import SandboxService

        return SandboxService(self)

    @service
    def approvals(self) -> ApprovalService:
        from appliance.control.approvals import ApprovalService

        return ApprovalService(self)

    @service
    def one_tap(self) -> OneTap:
        """One-tap approval links: mint (for notifications) and redeem (the link's page)."""
        from appliance.control.one_tap import OneTap

        return OneTap(self.config.state_dir)

    @service
    def notify(self) -> NotifyService:
        """Webhook notifications of what the audit log records (appliance/control/notify/)."""
        from appliance.control.notify.service import NotifyService

        return NotifyService(self)

    @service
    def kill_switch(self) -> KillSwitchService:
        from appliance.control.killswitch import KillSwitchService

        return KillSwitchService(self)

    # -- control-agents: agents made from blueprints ------------------------------------------

    @service
    def agents(self) -> AgentService:
        from appliance.control.agents import AgentService

        return AgentService(self)

    @service
    def turns(self) -> TurnService:
        """Agent turns: gated, driven, streamed and recorded (manual and scheduled alike)."""
        from appliance.control.turns import TurnService

        return TurnService(self)

    # -- control-schedules: schedules, check-ins, and parking on shutdown ---------------------

    @service
    def deployed(self) -> DeployedBlueprints:
        """Each agent's current blueprint (cached per deployment), for the threads below."""
        from appliance.control.schedules import DeployedBlueprints

        return DeployedBlueprints(self.config)

    @service
    def scheduler(self) -> Scheduler:
        from appliance.control.scheduler import Scheduler
        from appliance.store.schedule_store import ScheduleStore

        return Scheduler(
            self.deployed.entries,
            lambda: self.turns,
            ScheduleStore(self.config.state_dir),
            self.audit_log.append,
        )

    @service
    def schedules(self) -> ScheduleService:
        from appliance.control.schedules import ScheduleService

        return ScheduleService(self.config, self.deployed)

    @service
    def liveness(self) -> Liveness:
        from appliance.control.liveness import Liveness
        from appliance.control.wiring import opened_manager

        return Liveness(self.deployed, lambda: opened_manager(self.config))

    def start_threads(self) -> None:
        """The plane's own threads (`serve control`): the sandboxes' reconciler, the approvals'
        expirer, the notifications' follower, the agents' check-ins and the scheduler (these two
        only as root: sandboxes are root's to manage)."""
        from appliance.control.sandboxes import reconcile_forever

        self._stop_threads = threading.Event()
        threads = [("reconcile", reconcile_forever, (self.sandboxes, self._stop_threads))]
        # held requests past their policy's hold_seconds denied (appliance/control/approvals.py)
        threads.append(("approval-expirer", self.approvals.run_expirer, (self._stop_threads,)))
        # decisions in the audit log pushed to notify.webhooks (any euid: it only reads the log)
        threads.append(("notify", self.notify.run, (self._stop_threads,)))
        if os.geteuid() == 0:
            threads.append(("liveness", self.liveness.run, (self._stop_threads,)))
            threads.append(("scheduler", self.scheduler.run, (self._stop_threads,)))
        for name, target, args in threads:
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop_scheduling(self) -> None:
        """No new scheduled turns from now on; the shutdown budget starts at the first call
        (the stop signal). Safe in a signal handler: it only sets a time and a flag of a
        scheduler already built (the handler may interrupt this very thread)."""
        if self._stop_signalled_at is None:
            self._stop_signalled_at = time.monotonic()
        scheduler = self.__dict__.get("scheduler")
        if scheduler is not None:
            scheduler.stop()

    def shutdown(self, park: bool = True) -> None:
        """The end of `serve control` (SIGTERM): the scheduler first, then the other threads
        (a reconciliation under way is let finish, briefly: it may be starting a sandbox),
        then every running agent parked (liveness.park_all), then the services closed; all
        within SHUTDOWN_BUDGET_S of the stop signal, the joins leaving parking what one
        sandbox's park needs at worst (liveness.PARK_NEEDS_S)."""
        from appliance.control.liveness import PARK_NEEDS_S, park_all
        from appliance.control.wiring import opened_manager

        self.stop_scheduling()
        assert self._stop_signalled_at is not None  # set just now, or by the signal
        deadline = self._stop_signalled_at + SHUTDOWN_BUDGET_S
        if self._stop_threads is not None:
            self._stop_threads.set()
        for thread in self._threads:  # one deadline for them all, not a timeout each
            thread.join(max(0.0, deadline - PARK_NEEDS_S - time.monotonic()))
        if park and self._threads and os.geteuid() == 0:
            park_all(self.deployed, lambda: opened_manager(self.config), deadline=deadline)
        self.close(wait_s=max(0.0, deadline - time.monotonic()))

    def close(self, wait_s: float = 2.0) -> None:
        """The services ever built closed (the scheduler's running turns given up to `wait_s`
        to record their end)."""
        for built in ("operators", "inference", "approvals", "one_tap", "notify"):
            if built in self.__dict__:
                self.__dict__[built].close()
        if "scheduler" in self.__dict__:
            self.__dict__["scheduler"].close(wait_s=min(2.0, wait_s))

    def status(self) -> dict[str, Any]:
        """What `appliance status --json` prints (the read-only helper, fed by this process)."""
        from appliance.ops.status import gather

        return gather(self.config)
