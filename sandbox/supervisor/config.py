"""sandbox.json: read, checked, defaults filled in; and the runtime's secret env file.

Any problem exits 2 (EXIT_CONFIG) with one line that names the file and the key. The keys for an
always-on runtime (`runtime`, `agent_socket`, `checkin`, `runtime_env_file`) are optional: absent,
the supervisor behaves as it always did (PID 1 exits with the agent's code).
"""

from __future__ import annotations

import json
from typing import Any

import landlock
from log import EXIT_CONFIG, die
from timing import EXIT_GRACE_S, STOP_GRACE_S

DEFAULT_CONFIG = "/run/appliance/config/sandbox.json"
RESTART_POLICIES = ("always", "never")
# Who may connect to the agent socket: "outside" (the default) = only a peer outside PID 1's pid
# namespace, i.e. the host; "any" = no check (tests that run the supervisor as a plain process,
# where host and sandbox share one pid namespace). See init.py's docstring.
SOCKET_PEERS = ("outside", "any")
RUNTIME_DEFAULTS = {
    "restart": "always",
    "backoff_initial_s": 1.0,
    "backoff_max_s": 60.0,
    "healthy_after_s": 60.0,
}


def load_config(path: str) -> dict[str, Any]:
    """Read and check the config; defaults for the optional keys. Any problem exits 2."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        die(EXIT_CONFIG, f"cannot read config {path}: {exc}")
    if not isinstance(cfg, dict):
        die(EXIT_CONFIG, f"{path}: expected a JSON object")
    cmd = cfg.get("command")
    if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
        die(EXIT_CONFIG, f"{path}: 'command' must be a non-empty list of strings")
    env = cfg.setdefault("env", {})
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        die(EXIT_CONFIG, f"{path}: 'env' must map names to strings")
    for key in ("egress_socket", "report_path"):
        if not isinstance(cfg.get(key), str):
            die(EXIT_CONFIG, f"{path}: '{key}' must be a path")
    cfg.setdefault("cwd", "/")
    cfg.setdefault("listen", "127.0.0.1:3128")
    cfg.setdefault("stop_grace_s", STOP_GRACE_S)
    cfg.setdefault("exit_grace_s", EXIT_GRACE_S)
    ll = cfg.setdefault("landlock", {})
    ll.setdefault("compatibility", "hard_requirement")
    ll.setdefault("min_abi", 1)
    ll.setdefault("fs", [])
    ll.setdefault("net", {"connect_tcp": [], "bind_tcp": []})
    if ll["compatibility"] not in ("hard_requirement", "best_effort"):
        die(EXIT_CONFIG, f"{path}: landlock.compatibility must be hard_requirement|best_effort")
    for rule in ll["fs"]:
        bad = [a for a in rule.get("access", []) if a not in landlock.FS_RIGHTS]
        if not isinstance(rule.get("path"), str) or not rule["path"].startswith("/") or bad:
            die(EXIT_CONFIG, f"{path}: bad landlock fs rule {rule!r}")
    _service_keys(cfg, path)
    return cfg


def _number(value: object, least: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= least


def _abs_path(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and "\0" not in value


def _service_keys(cfg: dict[str, Any], path: str) -> None:
    """Check the always-on keys; each absent one becomes None (`checkin.after_s == 0`: None)."""
    runtime = cfg.get("runtime")
    if runtime is not None:
        if not isinstance(runtime, dict) or set(runtime) - set(RUNTIME_DEFAULTS):
            die(EXIT_CONFIG, f"{path}: 'runtime' takes only {sorted(RUNTIME_DEFAULTS)}")
        runtime = {**RUNTIME_DEFAULTS, **runtime}
        if runtime["restart"] not in RESTART_POLICIES:
            die(EXIT_CONFIG, f"{path}: runtime.restart must be always|never")
        for key in ("backoff_initial_s", "backoff_max_s", "healthy_after_s"):
            if not _number(runtime[key], 0.01):
                die(EXIT_CONFIG, f"{path}: runtime.{key} must be a number of seconds > 0")
        if runtime["backoff_max_s"] < runtime["backoff_initial_s"]:
            die(EXIT_CONFIG, f"{path}: runtime.backoff_max_s is below backoff_initial_s")
    cfg["runtime"] = runtime
    sock = cfg.get("agent_socket")
    if sock is not None:
        port = sock.get("port") if isinstance(sock, dict) else None
        if not (isinstance(sock, dict) and _abs_path(sock.get("path"))) or not (
            isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535
        ):
            die(EXIT_CONFIG, f'{path}: \'agent_socket\' must be {{"path": "/...", "port": N}}')
        sock = {"peers": "outside", **sock}
        if sock["peers"] not in SOCKET_PEERS:
            die(EXIT_CONFIG, f"{path}: agent_socket.peers must be outside|any")
    cfg["agent_socket"] = sock
    checkin = cfg.get("checkin")
    if checkin is not None:
        if not (
            isinstance(checkin, dict)
            and _abs_path(checkin.get("path"))
            and _number(checkin.get("after_s"), 0)
        ):
            die(EXIT_CONFIG, f'{path}: \'checkin\' must be {{"path": "/...", "after_s": N}}')
        if checkin["after_s"] == 0:  # 0 = fail-closed off
            checkin = None
    cfg["checkin"] = checkin
    env_file = cfg.get("runtime_env_file")
    if env_file is not None and not _abs_path(env_file):
        die(EXIT_CONFIG, f"{path}: 'runtime_env_file' must be an absolute path")
    cfg["runtime_env_file"] = env_file


def read_runtime_env(path: str) -> dict[str, str]:
    """The runtime's secret variables (read before Landlock). Errors never quote the content."""
    try:
        with open(path, encoding="utf-8") as f:
            env = json.load(f)
    except OSError as exc:
        die(EXIT_CONFIG, f"cannot read the runtime env file {path}: {exc.strerror}")
    except ValueError:
        die(EXIT_CONFIG, f"{path}: not valid JSON")
    if not (
        isinstance(env, dict)
        and all(isinstance(k, str) and k and "=" not in k and "\0" not in k for k in env)
        and all(isinstance(v, str) and "\0" not in v for v in env.values())
    ):
        die(EXIT_CONFIG, f"{path}: expected a JSON object of variable names to strings")
    return env
