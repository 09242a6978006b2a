"""A real control plane (`appliance serve control`) on a short private state dir, with its TCP
port on a free port, for the control-plane sandbox tests (test_control_sandboxes.py,
test_control_isolation.py): the CLI and the API against it, sandboxes made through it, and what
each test created removed afterwards."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env, free_port
from tests.sandbox_fixtures import ensure_base_image, force_remove_container, kill_proxies, run_cli

POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "policies"
HOLD_SECONDS = 600  # held requests must outlive the whole module
CONFLICT_EXIT = 10

# The agent: holds one request per host named on its command line through the in-sandbox proxy
# port (each stays pending until an operator decides), then idles.
AGENT = r"""
import http.client, sys, threading, time
def fetch(host):
    try:
        c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=900)
        c.request("GET", f"http://{host}/")
        print("DONE", host, c.getresponse().status, flush=True)
    except Exception as exc:
        print("DONE", host, repr(exc), flush=True)
for host in sys.argv[1:]:
    threading.Thread(target=fetch, args=(host,), daemon=True).start()
print("AGENT READY", flush=True)
time.sleep(10**6)
"""


@dataclass
class Plane:
    """A control plane on a short private state dir (unix socket paths must stay <= 107 B)."""

    scratch: Path
    env: dict[str, str]
    port: int
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    proc: subprocess.Popen | None = None
    created: set[str] = field(default_factory=set)

    @property
    def state(self) -> Path:
        return self.scratch / "s"

    @property
    def socket(self) -> Path:
        return control_socket(self.state)

    def start(self) -> None:
        self.proc = self.stack.enter_context(running_control_plane(self.env, self.state))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def cli(self, *args: str, ok: bool = True, timeout: float = 180):
        proc = run_cli(*args, env=self.env, timeout=timeout)
        if ok:
            assert proc.returncode == 0, f"appliance {' '.join(args)}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def api(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://control/api/v1",
            timeout=180,
        )

    def policy_file(self, name: str, **network: Any) -> Path:
        policy = yaml.safe_load((POLICIES / "default.yaml").read_text())
        policy["network"]["approval"] = {"mode": "hold", "hold_seconds": HOLD_SECONDS}
        policy["network"].update(network)
        path = self.scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def create(self, name: str, *agent_args: str, policy: Path | None = None) -> None:
        self.created.add(name)
        command = ["--", "python3", "-I", "-c", AGENT, *agent_args] if agent_args else []
        policy = policy or self.policy_file(name)
        self.cli("sandbox", "create", name, "--policy", str(policy), *command)

    def states(self) -> dict[str, str]:
        rows = json.loads(self.cli("sandbox", "list", "--json").stdout)
        return {r["name"]: r["state"] for r in rows}

    def pending(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("approvals", "list", "--json").stdout)

    def wait_pending(self, box: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mine = [p for p in self.pending() if p["sandbox"] == box]
            if len(mine) >= count:
                return mine
            time.sleep(0.3)
        raise AssertionError(f"{box}: fewer than {count} pending approvals after {timeout} s")


@contextlib.contextmanager
def started_plane(prefix: str) -> Iterator[Plane]:
    """A running control plane; every sandbox the test created (Plane.created) is removed."""
    ensure_base_image()
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    env = cli_env(scratch / "s", scratch)
    port = free_port()
    env["APPLIANCE_CONTROL__PORT"] = str(port)  # on, on a free port: the probes try it
    p = Plane(scratch=scratch, env=env, port=port)
    try:
        p.start()
        yield p
    finally:
        if p.proc is not None and p.proc.poll() is None:
            for name in sorted(p.created):
                run_cli("sandbox", "rm", name, env=env)
        p.stack.close()
        for name in sorted(p.created):
            force_remove_container(name)
            kill_proxies(name, p.state)
        shutil.rmtree(scratch, ignore_errors=True)
