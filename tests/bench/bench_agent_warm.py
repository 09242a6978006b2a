"""Benchmark: a warm OpenClaw turn through the always-on runtime against the per-turn process it
replaced, and what an idle always-on agent costs in memory.

Starts its own appliance (`appliance up`, embedded model) in a temporary state dir, creates one
OpenClaw agent (the catalog's openclaw@1.1.0: no schedule, so nothing else takes turns) and waits
for its runtime (`openclaw gateway run`) to answer /readyz, then, side by side in one run:

(a) the old path: `openclaw agent --local` run in the same sandbox as the agent (the supervisor's
    exec, the agent's Landlock domain: SandboxManager.exec, as the control plane ran every turn
    before issue 13, with the argv and env of the runtime adapter's old `turn()`), then its
    session export (the old `export_session()`), in session A: one turn to open the session,
    then --old more;
(b) warm turns through the always-on runtime, `appliance agent run NAME MSG --session B --json`
    (the CLI, the control plane, the agent socket, /v1/responses): one to open the session, then
    --warm more;
each with its wall time, the model's time for that turn (the sum of latency_s of the agent key's
ledger rows admitted during it) and the overhead (wall - model). Targets: a warm turn's overhead
<= 2 s and its wall time <= 20 s with the embedded model.
(c) idle memory of the always-on agent: RSS and PSS of every process in its sandbox (the
    container's PID 1 and its descendants, from the host's /proc) and of its egress proxy and
    the monitor that launched it (on the host), right after the runtime is ready and again
    after the turns and --idle seconds; how many idle agents fit in 10 GiB.

    sudo .venv/bin/python tests/bench/bench_agent_warm.py [--old 2] [--warm 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.up_env import environment  # noqa: E402
from tests.sandbox_fixtures import podman_client  # noqa: E402

APPLIANCE = str(Path(sys.executable).parent / "appliance")
AGENT = "bench-warm"
GIB = 1 << 30
WEIGHTS_CACHE = Path("/var/tmp/appliance-bench-models")  # converted weights, kept across runs
TARGET_OVERHEAD_S = 2.0
TARGET_WALL_S = 20.0
MESSAGE = "Reply with the word pong"

# The old per-turn path, as blueprints/runtimes/openclaw.py ran it before the always-on runtime
# (its `turn()` and `export_session()` at commit 370fa6a): kept here so the comparison outlives
# them. Its own state dir: the live gateway's SQLite store is not shared with a second writer.
OLD_STATE_DIR = "/home/agent/.openclaw-old-path"
OLD_ENV = {
    "OPENCLAW_OFFLINE": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_SKIP_CHANNELS": "1",
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "OPENCLAW_CONFIG_READONLY": "1",
    "DO_NOT_TRACK": "1",
    "OPENCLAW_PROXY_URL": "http://127.0.0.1:3128",
    "OPENCLAW_CONFIG_PATH": "/run/appliance/agent/openclaw.json",
    "OPENCLAW_STATE_DIR": OLD_STATE_DIR,
    "OPENCLAW_GATEWAY_TOKEN": "unused-by-agent-local",
}
WORKSPACE = "/home/agent/workspace"


def old_turn_argv(message: str, session: str, timeout_s: int) -> list[str]:
    return [
        "openclaw", "agent", "--local", "--agent", "main",
        "--session-key", f"agent:main:{session}", "--message", message, "--json",
        "--timeout", str(timeout_s),
    ]  # fmt: skip


def old_export_argv(session: str) -> list[str]:
    """The old export, after removing the previous one: OpenClaw refuses to write over it
    (EEXIST), so the old path's export failed from a session's second turn on."""
    out_dir = f"{WORKSPACE}/.openclaw/trajectory-exports/{session}"
    script = (
        f"rm -rf {out_dir} && openclaw sessions export-trajectory --agent main "
        f"--session-key agent:main:{session} --workspace {WORKSPACE} --output {session} "
        f"--json >/dev/null && cat {out_dir}/events.jsonl"
    )
    return ["sh", "-c", script]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old", type=int, default=2, help="old-path turns after the first")
    p.add_argument("--warm", type=int, default=3, help="always-on turns after the first")
    p.add_argument("--idle", type=float, default=15.0, help="seconds idle before measuring")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bw-"))  # short: unix sockets live under it
    env = environment(root, None, state="s")
    WEIGHTS_CACHE.mkdir(parents=True, exist_ok=True)
    (root / "models" / "cache").symlink_to(WEIGHTS_CACHE)
    os.environ.update(env)  # load_config() in this process reads the same state dir
    subprocess.run([APPLIANCE, "up", "--timeout", "600"], env=env, check=True)
    try:
        subprocess.run(
            [APPLIANCE, "agent", "create", AGENT, "--blueprint", "openclaw@1.1.0"],
            env=env,
            check=True,
        )
        figures = run(args, env)
    finally:
        subprocess.run([APPLIANCE, "agent", "rm", AGENT], env=env, check=False)
        subprocess.run([APPLIANCE, "down"], env=env, check=False)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


def run(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store
    from appliance.store.inference_store import InferenceStore

    config = load_config({})
    with open_store(config.state_dir) as store, InferenceStore(config.state_dir) as ledger:
        m = sandbox_manager(config, store)
        key = ledger.find_key(f"sandbox-{AGENT}")
        assert key is not None, "the agent has no key"
        t0 = time.monotonic()
        wait_ready(m)
        ready_s = time.monotonic() - t0
        memory_ready = memory(m, config.state_dir)

        def model_time(since: float, until: float) -> dict[str, Any]:
            deadline = time.monotonic() + 3  # the gateway settles a row just after its last byte
            while True:
                used = ledger.usage_between(key.id, since, until)
                if not used["open"] or time.monotonic() > deadline:
                    return used
                time.sleep(0.05)

        old = [old_turn(m, model_time, i) for i in range(1 + args.old)]
        warm = [new_turn(env, model_time, i) for i in range(1 + args.warm)]
        time.sleep(args.idle)
        memory_idle = memory(m, config.state_dir)
        runtime = m.runtime_state(AGENT) or {}
    return {
        "runtime_ready_s": round(ready_s, 1),
        "runtime": {k: runtime.get(k) for k in ("state", "pid", "starts", "restarts")},
        "old": old,
        "warm": warm,
        "memory_ready": memory_ready,
        "memory_idle": memory_idle,
    }


def wait_ready(m: Any, timeout: float = 180) -> None:
    """The runtime running (supervisor report) and answering /readyz through the agent socket."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (m.runtime_state(AGENT) or {}).get("state") == "running":
            transport = httpx.HTTPTransport(uds=str(m.agent_socket(AGENT)))
            try:
                with httpx.Client(transport=transport, timeout=5) as client:
                    if client.get("http://agent/readyz").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise SystemExit(f"the runtime was not ready within {timeout:.0f} s: {m.runtime_state(AGENT)}")


def old_turn(m: Any, model_time: Any, i: int) -> dict[str, Any]:
    since, t0 = time.time(), time.monotonic()
    argv = old_turn_argv(f"{MESSAGE} ({i})", "a", 600)
    code, out, err = m.exec(AGENT, argv, env=OLD_ENV, timeout_s=720)
    turn_s = time.monotonic() - t0
    ecode, _eout, eerr = m.exec(AGENT, old_export_argv("a"), env=OLD_ENV, timeout_s=120)
    wall = time.monotonic() - t0
    if code != 0:
        tail = err.decode(errors="replace")[-800:]
        raise SystemExit(f"old path turn {i}: exit {code}: {tail}")
    if ecode != 0:  # the old path went on too (an `agent.export_failed` audit record)
        print(f"old path turn {i}: export exit {ecode}: {eerr.decode(errors='replace')[-300:]}")
    used = model_time(since, time.time())
    reply = json.loads(out)
    usage = reply["meta"]["agentMeta"]["usage"]
    return row("old", i, wall, used, turn_s=turn_s, export_exit=ecode, usage=usage)


def new_turn(env: dict[str, str], model_time: Any, i: int) -> dict[str, Any]:
    since, t0 = time.time(), time.monotonic()
    done = subprocess.run(
        [APPLIANCE, "agent", "run", AGENT, f"{MESSAGE} ({i})", "--session", "b", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"warm turn {i}: exit {done.returncode}: {done.stderr[-800:]}")
    record = json.loads(done.stdout)
    used = model_time(since, time.time())
    return row("warm", i, wall, used, control_plane_s=record["duration_s"], usage=record["usage"])


def row(kind: str, i: int, wall: float, used: dict[str, Any], **more: Any) -> dict[str, Any]:
    model = float(used["latency_s"])
    out = {
        "path": kind,
        "turn": i,
        "wall_s": round(wall, 2),
        "model_s": round(model, 2),
        "overhead_s": round(wall - model, 2),
        "requests": int(used["requests"]),
        "prompt_tokens": int(used["prompt_tokens"]),
        "completion_tokens": int(used["completion_tokens"]),
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in more.items()},
    }
    print(json.dumps(out), flush=True)
    return out


def memory(m: Any, state_dir: Path) -> dict[str, Any]:
    """RSS and PSS (KiB) of every process in the sandbox, from the host's /proc: the container's
    PID 1 (as Podman reports it) and its descendants; and of the sandbox's egress proxy."""
    pid1 = int(podman_client().containers.get(AGENT).attrs["State"]["Pid"])
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    sandbox, todo = [], [pid1]
    while todo:
        pid = todo.pop()
        sandbox.append(proc_memory(pid))
        todo.extend(children.get(pid, []))
    proxy = [proc_memory(pid) for pid in host_side(AGENT, state_dir)]
    rss = sum(p["rss_kib"] for p in sandbox)
    pss = sum(p["pss_kib"] for p in sandbox)
    proxy_rss = sum(p["rss_kib"] for p in proxy)
    proxy_pss = sum(p["pss_kib"] for p in proxy)
    per_agent_kib = rss + proxy_rss
    return {
        "processes": sandbox,
        "proxy": proxy,
        "sandbox_rss_mib": round(rss / 1024, 1),
        "sandbox_pss_mib": round(pss / 1024, 1),
        "proxy_rss_mib": round(proxy_rss / 1024, 1),
        "proxy_pss_mib": round(proxy_pss / 1024, 1),
        "agents_in_10_gib_rss": int(10 * GIB / 1024 // per_agent_kib) if per_agent_kib else None,
        "agents_in_10_gib_pss": int(10 * GIB / 1024 // (pss + proxy_pss)) if pss else None,
    }


def host_side(sandbox: str, state_dir: Path) -> list[int]:
    """The sandbox's processes on the host: its egress proxy and the monitor that launched it
    (matched on their argv: the module, the sandbox's name, this state dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if (
            {b"sandbox.proxy", b"appliance.control.egress_monitor"} & set(argv)
            and sandbox.encode() in argv
            and any(str(state_dir).encode() in a for a in argv)
        ):
            pids.append(int(proc.name))
    return pids


def proc_memory(pid: int) -> dict[str, Any]:
    base = Path(f"/proc/{pid}")
    try:
        status = dict(
            line.split(":", 1) for line in (base / "status").read_text().splitlines() if ":" in line
        )
        rollup = (base / "smaps_rollup").read_text()
        pss = next(int(x.split()[1]) for x in rollup.splitlines() if x.startswith("Pss:"))
        name = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, StopIteration):
        return {"pid": pid, "cmd": "(gone)", "rss_kib": 0, "pss_kib": 0}
    rss = int(status.get("VmRSS", "0 kB").split()[0])
    return {"pid": pid, "cmd": name.strip()[:80], "rss_kib": rss, "pss_kib": pss}


def report(f: dict[str, Any]) -> None:
    print(f"\nruntime ready {f['runtime_ready_s']} s after create; {f['runtime']}")
    print(f"\n{'turn':36} {'wall s':>7} {'model s':>8} {'overhead s':>11} {'prompt':>7}")
    for r in [*f["old"], *f["warm"]]:
        label = {"old": "old: agent --local + export", "warm": "always-on: agent run"}[r["path"]]
        label += " (opens)" if r["turn"] == 0 else ""
        print(
            f"{label:36} {r['wall_s']:7.1f} {r['model_s']:8.1f} {r['overhead_s']:11.1f} "
            f"{r['prompt_tokens']:7d}"
        )

    def med(rows: list[dict[str, Any]], k: str) -> float:
        return statistics.median(r[k] for r in rows[1:] or rows)

    warm = f["warm"]
    print(
        f"\nmedian of the turns after the first: old path wall {med(f['old'], 'wall_s'):.1f} s, "
        f"overhead {med(f['old'], 'overhead_s'):.1f} s | always-on wall "
        f"{med(warm, 'wall_s'):.1f} s, overhead {med(warm, 'overhead_s'):.1f} s"
    )
    worst_overhead = max(r["overhead_s"] for r in warm[1:] or warm)
    worst_wall = max(r["wall_s"] for r in warm[1:] or warm)
    print(
        f"targets: warm overhead <= {TARGET_OVERHEAD_S} s: worst {worst_overhead:.1f} s "
        f"({'met' if worst_overhead <= TARGET_OVERHEAD_S else 'MISSED'}); warm wall <= "
        f"{TARGET_WALL_S} s: worst {worst_wall:.1f} s "
        f"({'met' if worst_wall <= TARGET_WALL_S else 'MISSED'})"
    )
    for label, mem in (("ready, no turn", f["memory_ready"]), ("idle after", f["memory_idle"])):
        print(
            f"\nmemory ({label}): sandbox RSS {mem['sandbox_rss_mib']} MiB (PSS "
            f"{mem['sandbox_pss_mib']}), egress proxy RSS {mem['proxy_rss_mib']} MiB (PSS "
            f"{mem['proxy_pss_mib']}); idle agents in 10 GiB: {mem['agents_in_10_gib_rss']} by "
            f"RSS, {mem['agents_in_10_gib_pss']} by PSS"
        )
        for proc in mem["processes"] + mem["proxy"]:
            print(f"  {proc['rss_kib'] / 1024:7.1f} MiB  {proc['pid']:>7}  {proc['cmd']}")


if __name__ == "__main__":
    main()
