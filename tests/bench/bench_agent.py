"""Benchmark: `agent create` split into its phases, and OpenClaw turn times on the embedded model.

Starts its own appliance (`appliance up`, embedded model) in a temporary state dir, then:
1. `agent create` N times (create → rm), timing the image phase (resolving the pinned image:
   a label lookup once built), the sandbox phase (Podman + supervisor ready) and agent-ready
   (workspace, budget, deployment record);
2. turns, side by side in one run: a cold turn (new session, nothing in the model's prefix
   cache), a warm turn in the same session (OpenClaw resends its ~6K-token prompt: the prefix
   cache serves it), and a new session after that (does the shared system prompt still hit?).
   Each is split into time to the model's reply and the rest (OpenClaw's Node start-up).

    sudo .venv/bin/python tests/bench/bench_agent.py [--creates 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import cli_env, free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
APPLIANCE = str(Path(sys.executable).parent / "appliance")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--creates", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ba-"))
    env = cli_env(
        root / "s",
        root,
        APPLIANCE_GATEWAY__PORT=str(free_port()),
        APPLIANCE_INFERENCE__BACKEND_LISTEN__PORT=str(free_port()),
    )
    os.environ.update(env)
    subprocess.run([APPLIANCE, "up", "--timeout", "600"], env=env, check=True)
    try:
        run(args)
    finally:
        subprocess.run([APPLIANCE, "down"], env=env, check=False)


def run(args: argparse.Namespace) -> None:
    from appliance.config import load_config
    from appliance.control.agent_manager import AgentManager
    from appliance.control.client import ControlClient
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store

    config = load_config({})
    with open_store(config.state_dir) as store:
        m = AgentManager(config, store, sandbox_manager(config, store))
        phases: dict[str, list[float]] = {"image": [], "sandbox": [], "agent ready": []}
        totals = []
        for i in range(args.creates):
            marks: list[tuple[str, float]] = []

            def mark(line: str, marks: list[tuple[str, float]] = marks) -> None:
                marks.append((line, time.monotonic()))

            t0 = time.monotonic()
            m.create(f"bench{i}", "openclaw", progress=mark)
            end = time.monotonic()
            image_at = next(t for line, t in marks if line.startswith("image:"))
            sandbox_at = next(t for line, t in marks if line.startswith("sandbox:"))
            phases["image"].append(image_at - t0)
            phases["sandbox"].append(sandbox_at - image_at)
            phases["agent ready"].append(end - sandbox_at)
            totals.append(end - t0)
            if i:
                m.remove(f"bench{i}")
        print(f"agent create (openclaw, image cached), median of {args.creates}:")
        print(f"  total        {statistics.median(totals) * 1000:7.0f} ms")
        for phase, times in phases.items():
            print(f"  {phase:12} {statistics.median(times) * 1000:7.0f} ms")

        rows: dict[str, list[tuple[float, float, dict]]] = {"cold": [], "warm": [], "new": []}
        for r in range(args.rounds):
            session = f"bench-{r}"
            for kind, sess in (("cold", session), ("warm", session), ("new", f"{session}-b")):
                if kind == "cold" and r:
                    subprocess.run([APPLIANCE, "down"], check=True, capture_output=True)
                    subprocess.run([APPLIANCE, "up"], check=True, capture_output=True)
                t0 = time.monotonic()
                with ControlClient(config, timeout=3600) as client:  # turns: the control plane's
                    result = client.run_turn("bench0", "Reply with the word pong", session=sess)
                total = time.monotonic() - t0
                model_s = float((result["raw"] or {}).get("meta", {}).get("durationMs", 0)) / 1000
                rows[kind].append((total, model_s, result["usage"]))
        print(f"turns (embedded SmolLM2 on this machine), {args.rounds} rounds:")
        for kind, label in (
            ("cold", "cold: new session, model cache empty"),
            ("warm", "warm: same session again"),
            ("new", "new session, cache warm"),
        ):
            total = statistics.median(t for t, _, _ in rows[kind])
            agent_s = statistics.median(a for _, a, _ in rows[kind])
            usage = rows[kind][-1][2]
            print(
                f"  {label:38} {total:6.1f} s (agent run {agent_s:5.1f} s) "
                f"input {usage.get('input')} cached {usage.get('cacheRead')} "
                f"output {usage.get('output')}"
            )
        m.remove("bench0")


if __name__ == "__main__":
    main()
