"""What `appliance status` reports, as data: one function per section, cheap enough for --watch.

Later subsystems add their sections to SECTIONS; each takes the config and the host snapshot.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import ApplianceConfig, config_files
from appliance.store.db import DB_NAME, open_store
from hardware.snapshot import HostSnapshot

Section = Callable[[ApplianceConfig, HostSnapshot], dict[str, Any]]


def is_listening(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def appliance_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    return {
        "version": __version__,
        "state_dir": str(config.state_dir),
        "initialised": (config.state_dir / DB_NAME).is_file(),
        "config_files": [str(p) for p in config_files() if p.is_file()],
    }


def host_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    return host.model_dump(mode="json", exclude={"gpus"})


def gpus_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    devices = [
        # GB10: NVML has no memory figures; telemetry reports the host's RAM (/proc/meminfo)
        {**g.model_dump(mode="json"), "memory_source": "host" if g.unified_memory else "device"}
        for g in host.gpus
    ]
    return {"count": len(host.gpus), "devices": devices}


def _service(config: ApplianceConfig, name: str) -> dict[str, Any]:
    """The supervisor's view of one service, or an empty dict when no supervisor runs."""
    from appliance.services.supervisor import read_services, supervisor_pid

    if supervisor_pid(config) is None:
        return {}
    return read_services(config).get(name, {})


def _backend_metrics(
    config: ApplianceConfig, endpoint: str, service: dict[str, Any]
) -> dict[str, Any] | None:
    from appliance.ops.backend_metrics import backend_metrics  # httpx, prometheus: only if up
    from appliance.services.supervisor import run_dir

    return backend_metrics(endpoint, run_dir(config), service.get("pid"))


def _container(service: dict[str, Any]) -> dict[str, Any] | None:
    """The backend's container (name, image) when the supervisor runs it in one, else None."""
    container = service.get("container")
    if isinstance(container, str):
        return {"name": container, "image": service.get("image")}
    if isinstance(container, dict):
        return {"name": container.get("name"), "image": container.get("image")}
    return None


def inference_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    listen = config.inference.backend_listen
    endpoint = f"http://{listen.host}:{listen.port}"
    service = _service(config, "backend")
    listening = is_listening(listen.host, listen.port)
    section: dict[str, Any] = {
        "endpoint": endpoint,
        "state": service.get("state") or ("listening" if listening else "down"),
        "detail": service.get("detail"),
        "pid": service.get("pid"),
        "restarts": service.get("restarts", []),  # the last few: {"at", "reason", "restart"}
        "metrics": _backend_metrics(config, endpoint, service) if listening else None,
        "container": _container(service),
        "plan": None,
    }
    if (config.state_dir / DB_NAME).is_file():
        with open_store(config.state_dir) as store:
            latest = store.latest_plan()
        if latest:
            plan = latest["plan"]
            section["plan"] = {
                "recorded_at": latest["recorded_at"],
                **{k: plan.get(k) for k in ("backend", "variant", "model", "served_model_name")},
            }
    return section


def gateway_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    gw = config.gateway
    service = _service(config, "gateway")
    listening = is_listening(gw.host, gw.port)
    return {
        "url": f"http://{gw.host}:{gw.port}/v1",
        "state": service.get("state") or ("listening" if listening else "down"),
        "detail": service.get("detail"),
        "pid": service.get("pid"),
        "restarts": service.get("restarts", []),
    }


def _socket_answers(path: Path, timeout: float = 0.2) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def control_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """The control plane: the supervisor's view of it, else whether its socket accepts."""
    from appliance.control.paths import socket_path
    from appliance.services.supervisor import control_url

    service = _service(config, "control")
    path = socket_path(config)
    return {
        "url": control_url(config),
        "socket": str(path),
        "state": service.get("state") or ("listening" if _socket_answers(path) else "down"),
        "detail": service.get("detail"),
        "pid": service.get("pid"),
        "restarts": service.get("restarts", []),
    }


def budgets_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """Per-key spend and budget state, and what the gateway served over the last minute."""
    if not (config.state_dir / DB_NAME).is_file():
        return {"keys": [], "throughput": None}
    from appliance.ops.usage import budget_report, throughput
    from appliance.store.inference_store import InferenceStore

    with InferenceStore(config.state_dir) as store:
        return {"keys": budget_report(store), "throughput": throughput(store)}


# -- sandboxes and approvals ---------------------------------------------------------------------
# Both stay cheap on a host without sandboxes: no store, or no records, returns before anything
# heavy (podman-py, the sandbox manager) is imported, and neither ever starts the Podman service.

ADMIN_TIMEOUT_S = 0.2  # per proxy admin socket: a wedged proxy must not stall the screen
PODMAN_TIMEOUT_S = 1.0


@dataclass
class _SandboxView:
    records: list[Any]  # SandboxRecord, by name
    held: str | None  # the kill-switch hold's reason
    manager: Any  # SandboxManager (paths, list) on a Podman it only reuses; None if no records


@contextmanager
def _sandbox_view(config: ApplianceConfig) -> Iterator[_SandboxView | None]:
    """The store's sandboxes, or None when there is no store yet (never creates one)."""
    if not (config.state_dir / DB_NAME).is_file():
        yield None
        return
    with open_store(config.state_dir) as store:
        if not _any_sandbox_state(store):
            yield _SandboxView([], None, None)
            return
        from appliance.store.sandbox_store import SandboxStore  # ~20 ms: sandbox.policy models

        boxes = SandboxStore(store)
        records = boxes.list()
        yield _SandboxView(records, boxes.held(), _manager(config, store) if records else None)


def _any_sandbox_state(store: Any) -> bool:
    # One cheap query before SandboxStore is imported: most hosts have no sandboxes and no hold.
    row = store.conn.execute(
        "SELECT EXISTS (SELECT 1 FROM sandboxes) OR EXISTS (SELECT 1 FROM kill_hold WHERE held)"
    ).fetchone()
    return bool(row[0])


def _manager(config: ApplianceConfig, store: Any) -> Any:
    from appliance.control.wiring import sandbox_manager
    from sandbox.lifecycle.errors import PodmanUnavailable
    from sandbox.lifecycle.podman_service import PodmanService

    class ReuseOnly(PodmanService):
        """Status must never start the service (slow, and a side effect): reuse or refuse."""

        def client(self, timeout: float = PODMAN_TIMEOUT_S) -> Any:
            # Caps is_running()'s ping too: a hung service costs a second, not a minute.
            return super().client(timeout=min(timeout, PODMAN_TIMEOUT_S))

        def start(self) -> Any:
            if not self.is_running():
                raise PodmanUnavailable("the Podman service is not running")
            return self.client()

    manager = sandbox_manager(config, store)
    manager.podman = ReuseOnly(user=config.sandbox.service_user)
    return manager


def _pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except PermissionError:
        return True  # exists, owned by another user (status run as non-root)
    except (OSError, ValueError):
        return False
    return True


def _proxy_alive(manager: Any, name: str) -> bool | None:
    try:
        return _pid_alive(manager.paths(name).proxy_pid)
    except Exception:  # no service user: paths() cannot be built, so the answer is unknown
        return None


def _podman_state(manager: Any) -> str:
    try:
        return "running" if manager.podman.is_running() else "down"
    except Exception:  # no service user (PreflightError)
        return "unavailable"


def _containers(manager: Any) -> tuple[str, dict[str, str]]:
    """The Podman service's state and, only if it already runs, each sandbox's container."""
    podman = _podman_state(manager)
    if podman != "running":
        return podman, {}
    try:
        return podman, {row["name"]: row["container"] for row in manager.list()}
    except Exception as exc:  # e.g. the service went away between the ping and the list
        return f"error: {type(exc).__name__}: {exc}", {}


def _no_sandboxes(held: str | None = None, error: str | None = None) -> dict[str, Any]:
    return {
        "count": 0,
        "by_state": {},
        "held": held,
        "podman": None,
        "sandboxes": [],
        "error": error,
    }


def sandboxes_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """Each sandbox's recorded state, its container (only if Podman already runs), its proxy."""
    try:
        with _sandbox_view(config) as view:
            if view is None or not view.records:
                return _no_sandboxes(view.held if view else None)
            podman, live = _containers(view.manager)
            rows = [
                {
                    "name": r.name,
                    "state": r.state,
                    "container": live.get(r.name),  # None: Podman was not asked
                    "proxy_alive": _proxy_alive(view.manager, r.name),
                }
                for r in view.records
            ]
            held = view.held
    except Exception as exc:  # a status screen reports what went wrong, it never raises
        return _no_sandboxes(error=f"{type(exc).__name__}: {exc}")
    return {
        "count": len(rows),
        "by_state": dict(Counter(r["state"] for r in rows)),
        "held": held,
        "podman": podman,
        "sandboxes": rows,
        "error": None,
    }


def _pending(socket_path: Path, name: str, now: float) -> list[dict[str, Any]]:
    # The control plane's client too (stdlib only: cheap to import, one small GET per proxy).
    from sandbox.proxy.admin_client import AdminClient

    if not socket_path.exists():
        return []  # no proxy: nothing can be waiting
    return [
        {
            "id": p.get("id"),
            "sandbox": p.get("sandbox", name),
            "host": p.get("host"),
            "port": p.get("port"),
            "waiting_s": round(max(0.0, now - float(p.get("created") or now)), 1),
        }
        for p in AdminClient(socket_path, timeout=ADMIN_TIMEOUT_S).list()
    ]


def approvals_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """Requests held for an operator, across every sandbox's egress proxy."""
    pending: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        with _sandbox_view(config) as view:
            now = time.time()
            for r in view.records if view else []:
                try:
                    socket_path = view.manager.paths(r.name).admin_socket
                except Exception as exc:  # no service user: the same for every sandbox, once
                    errors.append(f"{type(exc).__name__}: {exc}")
                    break
                try:
                    pending.extend(_pending(socket_path, r.name, now))
                except Exception as exc:  # one wedged proxy must not hide the others
                    errors.append(f"{r.name}: {type(exc).__name__}: {exc}")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    pending.sort(key=lambda p: -p["waiting_s"])  # the longest wait first
    return {"count": len(pending), "pending": pending, "errors": errors}


def agents_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """The agent inventory: blueprint@version, state, uptime, turns, tokens today vs budget."""
    try:
        if not (config.state_dir / DB_NAME).is_file():
            return {"count": 0, "agents": [], "error": None}
        with open_store(config.state_dir) as store:
            live = store.conn.execute(
                "SELECT EXISTS (SELECT 1 FROM agent_deployments WHERE outcome = 'active')"
            ).fetchone()[0]
            if not live:
                return {"count": 0, "agents": [], "error": None}
            from appliance.control.agent_manager import AgentManager  # only with agents
            from appliance.control.wiring import sandbox_manager
            from appliance.store.schedule_store import read_states

            rows = AgentManager(config, store, sandbox_manager(config, store)).inventory()
            schedules = _schedules(read_states(store.conn))
    except Exception as exc:  # a status screen reports what went wrong, it never raises
        return {"count": 0, "agents": [], "error": f"{type(exc).__name__}: {exc}"}
    now = time.time()
    for row in rows:
        row["uptime_s"] = round(now - row["since"]) if row["state"] == "running" else None
        row["schedule"] = schedules.get(row["name"])
    return {"count": len(rows), "agents": rows, "error": None}


def _schedules(states: list[Any]) -> dict[str, dict[str, Any]]:
    """Per agent with a schedule: its soonest next run, its latest run (with its outcome) and
    its latest skip (with the reason), over its entries: what the control plane's scheduler last
    wrote (`next_run_at` is stale while it is down)."""
    out: dict[str, dict[str, Any]] = {}
    for s in states:
        agent = out.setdefault(
            s.agent,
            {"entries": 0, "next_run_at": None, "last_run_at": None, "last_outcome": None,
             "last_reason": None, "last_skip_at": None, "last_skip_reason": None},
        )  # fmt: skip
        agent["entries"] += 1
        if s.next_run_at is not None and (
            agent["next_run_at"] is None or s.next_run_at < agent["next_run_at"]
        ):
            agent["next_run_at"] = s.next_run_at
        if s.last_run_at is not None and (
            agent["last_run_at"] is None or s.last_run_at > agent["last_run_at"]
        ):
            agent.update(
                last_run_at=s.last_run_at, last_outcome=s.last_outcome, last_reason=s.last_reason
            )
        if s.last_skip_at is not None and (
            agent["last_skip_at"] is None or s.last_skip_at > agent["last_skip_at"]
        ):
            agent.update(last_skip_at=s.last_skip_at, last_skip_reason=s.last_skip_reason)
    return out


SECTIONS: dict[str, Section] = {
    "appliance": appliance_section,
    "host": host_section,
    "gpus": gpus_section,
    "inference": inference_section,
    "gateway": gateway_section,
    "control": control_section,
    "budgets": budgets_section,
    "sandboxes": sandboxes_section,
    "approvals": approvals_section,
    "agents": agents_section,
}


def gather(config: ApplianceConfig, host: HostSnapshot | None = None) -> dict[str, Any]:
    if host is None:
        from hardware.telemetry import collect

        host = collect()
    report: dict[str, Any] = {"taken_at": round(time.time(), 3)}
    for name, section in SECTIONS.items():
        report[name] = section(config, host)
    pending = Counter(p["sandbox"] for p in report["approvals"]["pending"])
    for agent in report["agents"]["agents"]:  # an agent's sandbox has the agent's name
        agent["pending_approvals"] = pending.get(agent["name"], 0)
    return report
