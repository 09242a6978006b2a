"""Benchmark: sandbox create → supervisor ready, versus a bare `podman run --rm IMAGE true`.

`SandboxManager.create` returns once the in-sandbox supervisor has written its enforcement report
(Landlock applied, agent started). The baseline is the same image, run by the service user's own
podman CLI: `podman --runtime runc run --rm --network none IMAGE true` (runc and no network are
what this host needs for any rootless container; see DESIGN.md), started with setuid/setgid like
the control plane starts that user's podman service (no runuser/PAM: it would only inflate the
baseline). `bare-api` is the same bare container through the podman service (podman-py create,
start, wait, remove): the API path the control plane uses, without anything of ours.

Rounds are interleaved (each round in a rotated order) and medians reported, with create ÷ bare
(target <= 1.3). A breakdown of create and remove, timed by wrapping the manager's steps and
podman-py's calls in this process (nothing is changed on disk), shows where the time goes.
`report lag` is how long after the report file was written `create` noticed it.

`--what-if` adds an interleaved mode measuring one suggested change, made in this process only:
the egress proxy is spawned in a thread, overlapping podman create/start and the report wait,
and joined before create returns. (Only sound for the bench's idle agent: a real agent could
connect before the proxy listens, so the real change needs the control plane to bind the
socket and hand the proxy the fd.) `--what-if-tree DIR` also runs that mode's proxy from DIR
(e.g. a copy of `sandbox/` with another change), through PYTHONPATH.

Needs root, podman, runc and the service user (scripts/setup.sh); builds or reuses the base image.

    sudo .venv/bin/python tests/bench/bench_sandbox.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

IMAGE = "localhost/appliance-base:latest"
POLICY = REPO / "sandbox" / "policies" / "default.yaml"


class Phases:
    """Wall time per named step, summed over one operation; a step inside another is part of
    the outer one (podman-py's create calls get, for instance)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if not self._depth:
                    self.now[label] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.now = dict(self.now), defaultdict(float)
        return out


def isolate(tmp: Path) -> None:
    """No real config layers; the state dir is ours (and short: unix socket paths live in it)."""
    for name in [n for n in os.environ if n.startswith("APPLIANCE_")]:
        del os.environ[name]
    os.environ["APPLIANCE_SYSTEM_CONFIG"] = str(tmp / "no-system-config.yaml")
    os.environ["XDG_CONFIG_HOME"] = str(tmp / "xdg")
    os.environ["APPLIANCE_STATE_DIR"] = str(tmp / "state")


def bare_cli(service: Any) -> float:
    acct = service.account
    argv = ["podman", "--runtime", "runc", "run", "--rm", "--network", "none", IMAGE, "true"]
    start = time.perf_counter()
    subprocess.run(
        argv, check=True, cwd=acct.pw_dir, env=service.env(), stdin=subprocess.DEVNULL,
        user=acct.pw_uid, group=acct.pw_gid, extra_groups=[],
    )  # fmt: skip
    return time.perf_counter() - start


def bare_api(client: Any) -> float:
    start = time.perf_counter()
    container = client.containers.create(IMAGE, ["true"], network_mode="none")
    container.start()
    container.wait()
    container.remove(force=True)
    return time.perf_counter() - start


def instrument(manager: Any, phases: Phases) -> None:
    from podman.domain.containers import Container
    from podman.domain.containers_manager import ContainersManager

    steps = {
        "_carry_over_network": "policy carry-over",
        "_prepare_dirs": "prepare dirs",
        "_new_key": "new key",
        "_start_proxy": "proxy start (spawn → ready)",
        "_client": "podman client",
        "_wait_report": "report wait (start → report seen)",
        "store_audit": "audit writes",
        "_stop_proxy": "proxy stop",
    }
    for attr, label in steps.items():
        phases.wrap(manager, attr, label)
    phases.wrap(ContainersManager, "create", "podman create (API)")
    phases.wrap(ContainersManager, "get", "podman get (API)")
    phases.wrap(Container, "start", "podman start (API)")
    phases.wrap(Container, "remove", "podman remove (API)")


class Overlap:
    """What if: the proxy starts in a thread while podman creates and starts the container."""

    def __init__(self, manager: Any, tree: Path | None) -> None:
        self.enabled = False
        self._tree = tree
        self._threads: dict[str, threading.Thread] = {}
        self._errors: dict[str, BaseException] = {}
        start_proxy, start_container = manager._start_proxy, manager._start_container

        def start_or_keep_error(name: str, paths: Any) -> None:
            try:
                start_proxy(name, paths)
            except BaseException as exc:
                self._errors[name] = exc

        def proxy_in_background(name: str, paths: Any) -> None:
            if not self.enabled:
                return start_proxy(name, paths)
            thread = threading.Thread(target=start_or_keep_error, args=(name, paths))
            thread.start()
            self._threads[name] = thread
            return None

        def container_then_join(name: str, container: Any) -> Any:
            try:
                return start_container(name, container)
            finally:
                if (thread := self._threads.pop(name, None)) is not None:
                    thread.join()
                if (error := self._errors.pop(name, None)) is not None:
                    raise error

        manager._start_proxy, manager._start_container = proxy_in_background, container_then_join

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        """For one round; the proxy it spawns inherits PYTHONPATH (the tree), set till the end."""
        old = os.environ.get("PYTHONPATH")
        if self._tree is not None:
            os.environ["PYTHONPATH"] = str(self._tree)
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
            os.environ.pop("PYTHONPATH", None)
            if old is not None:
                os.environ["PYTHONPATH"] = old


def report_lag(manager: Any, name: str, returned: float) -> float:
    """Seconds between the report file's mtime and create() returning."""
    report = manager.paths(name).report / "enforcement.json"
    return returned - report.stat().st_mtime


def sandbox_round(manager: Any, policy: Any, name: str, phases: Phases) -> dict[str, Any]:
    phases.take()  # the bare runs go through the same podman-py calls: not ours
    start = time.perf_counter()
    manager.create(name, policy, None)
    created_wall = time.time()
    created = time.perf_counter() - start
    create_parts = phases.take()
    lag = report_lag(manager, name, created_wall)
    start = time.perf_counter()
    manager.remove(name)
    removed = time.perf_counter() - start
    return {
        "create": created,
        "remove": removed,
        "lag": lag,
        "create_parts": create_parts,
        "remove_parts": phases.take(),
    }


def summarize(name: str, rows: list[dict[str, float]], total: float) -> None:
    labels = sorted({k for r in rows for k in r}, key=lambda k: -statistics.median(
        [r.get(k, 0.0) for r in rows]))  # fmt: skip
    accounted = 0.0
    print(f"  {name} breakdown (medians over rounds):")
    for label in labels:
        value = statistics.median([r.get(label, 0.0) for r in rows])
        accounted += value
        print(f"    {label:38s} {value * 1e3:8.1f} ms")
    print(f"    {'(rest: store, spec, python)':38s} {(total - accounted) * 1e3:8.1f} ms")


@contextlib.contextmanager
def managed(tmp: Path) -> Iterator[Any]:
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store

    state = tmp / "state"
    config = load_config({"state_dir": str(state)})
    with open_store(state) as store:
        yield sandbox_manager(config, store)


def run(args: argparse.Namespace, tmp: Path) -> None:
    from sandbox.lifecycle.manager import read_policy_file
    from tests.sandbox_fixtures import ensure_base_image, podman_client

    ensure_base_image()
    policy = read_policy_file(POLICY)
    policy = policy.with_network(
        policy.network.model_copy(
            update={"approval": policy.network.approval.model_copy(update={"mode": "deny"})}
        )
    )
    with managed(tmp) as manager:
        service, client, phases = manager.podman, podman_client(), Phases()
        instrument(manager, phases)
        overlap = Overlap(manager, args.what_if_tree)
        prefix = f"bench-{os.getpid()}"
        sandbox_round(manager, policy, f"{prefix}-warm", phases)  # caches, first client ping
        bare_cli(service)
        bare_api(client)
        times: dict[str, list[float]] = defaultdict(list)
        rows: list[dict[str, Any]] = []
        modes = ["sandbox", "bare", "bare-api"] + (["what-if"] if args.what_if else [])
        for i in range(args.rounds):
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                if mode == "bare":
                    times["bare"].append(bare_cli(service))
                elif mode == "bare-api":
                    times["bare-api"].append(bare_api(client))
                elif mode == "what-if":
                    with overlap.on():
                        row = sandbox_round(manager, policy, f"{prefix}-w{i}", phases)
                    times["what-if"].append(row["create"])
                else:
                    row = sandbox_round(manager, policy, f"{prefix}-{i}", phases)
                    rows.append(row)
                    for key in ("create", "remove", "lag"):
                        times[key].append(row[key])
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{args.rounds} rounds, interleaved; image {IMAGE}")
        print(f"  bare `podman run --rm ... true` (CLI)  {med['bare'] * 1e3:8.1f} ms")
        print(f"  bare create+start+wait+rm (API)       {med['bare-api'] * 1e3:8.1f} ms")
        print(f"  sandbox create → supervisor ready     {med['create'] * 1e3:8.1f} ms")
        print(f"  sandbox remove                        {med['remove'] * 1e3:8.1f} ms")
        print(f"  create ÷ bare: {med['create'] / med['bare']:.2f} (target <= 1.3)")
        print(f"  create + remove ÷ bare (both include teardown): "
              f"{(med['create'] + med['remove']) / med['bare']:.2f}")  # fmt: skip
        print(f"  report lag (written → noticed)        {med['lag'] * 1e3:8.1f} ms")
        if args.what_if:
            tree = f", proxy from {args.what_if_tree}" if args.what_if_tree else ""
            print(f"  what if (proxy start overlapped{tree}): create {med['what-if'] * 1e3:.1f} ms"
                  f" = {med['what-if'] / med['bare']:.2f} of bare")  # fmt: skip
        summarize("create", [r["create_parts"] for r in rows], med["create"])
        summarize("remove", [r["remove_parts"] for r in rows], med["remove"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--what-if", action="store_true", help="also time the overlapped proxy start")
    p.add_argument("--what-if-tree", type=Path, help="run the what-if proxy from this tree")
    args = p.parse_args()
    from tests.sandbox_fixtures import sandbox_skip_reason

    if (why := sandbox_skip_reason()) is not None:
        raise SystemExit(f"cannot run sandboxes here: {why}")
    with tempfile.TemporaryDirectory(prefix="bsb-", dir="/tmp") as tmp:
        isolate(Path(tmp))
        try:
            run(args, Path(tmp))
        finally:
            cleanup(Path(tmp))


def cleanup(tmp: Path) -> None:
    """Whatever a failed round left: containers of this run, and their proxies."""
    from tests.sandbox_fixtures import force_remove_container, kill_proxies

    with managed(tmp) as manager:
        for record in manager.boxes.list():
            with contextlib.suppress(Exception):
                manager.remove(record.name)
            force_remove_container(record.name)
            kill_proxies(record.name, tmp / "state")


if __name__ == "__main__":
    main()
