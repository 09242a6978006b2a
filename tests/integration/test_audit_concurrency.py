"""Many processes appending to one audit chain at once (direct, batched, through the background
sink, through the store), and the egress proxy writing into it: nothing lost, chain intact."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.audit import ChainWriter, verify
from appliance.store.inference_store import InferenceStore
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env

pytestmark = pytest.mark.integration

PER_WRITER = 150

WRITER = r"""
import sys, time
from pathlib import Path
from appliance.audit import BackgroundAudit, ChainWriter
from appliance.store.inference_store import InferenceStore

mode, name, count, path, go = sys.argv[1:]
count, path, go = int(count), Path(path), float(go)
while time.time() < go:  # start together, so the appends really interleave
    time.sleep(0.001)
if mode == "direct":
    w = ChainWriter(path)
    for i in range(count):
        w.append("load", writer=name, i=i)
elif mode == "batch":
    w = ChainWriter(path)
    for start in range(0, count, 10):
        batch = range(start, min(start + 10, count))
        w.append_many([("load", {"writer": name, "i": i}) for i in batch])
elif mode == "background":
    sink = BackgroundAudit(ChainWriter(path))
    for i in range(count):
        sink.audit("load", writer=name, i=i)
    sink.close()
elif mode == "store":
    with InferenceStore(path.parent.parent) as store:
        for i in range(count):
            store.audit("load", writer=name, i=i)
"""


def _check(path: Path, expected: dict[str, int]) -> list[dict]:
    result = verify(path)
    assert result.ok, [str(p) for p in result.problems[:5]]
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    for name, count in expected.items():
        mine = [r["i"] for r in recs if r.get("writer") == name]
        assert mine == list(range(count)), f"{name}: lost or reordered records"
    assert len(recs) == sum(expected.values())
    return recs


def test_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit" / "audit.jsonl"
    # Migrate the database first: two processes opening a fresh store at once race on the
    # migration (appliance/store/db.py reads user_version outside its BEGIN IMMEDIATE).
    InferenceStore(tmp_path / "state").close()
    modes = ["direct", "direct", "batch", "background", "store", "store"]
    go = time.time() + 1.5  # imports take a while on two cores
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, mode, f"w{n}", str(PER_WRITER), str(path), str(go)],
            env=cli_env(tmp_path / "state", tmp_path),
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, mode in enumerate(modes)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    recs = _check(path, {f"w{n}": PER_WRITER for n in range(len(modes))})
    writers = [r["writer"] for r in recs]
    switches = sum(a != b for a, b in itertools.pairwise(writers))
    assert switches > len(modes), "the writers did not interleave: the test proved nothing"


def test_threads_sharing_one_writer_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = ChainWriter(path)

    def work(name: str) -> None:
        for i in range(PER_WRITER):
            writer.append("load", writer=name, i=i)

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check(path, {f"t{n}": PER_WRITER for n in range(4)})


def _connect(sock_path: Path, host: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        return s.recv(4096)


def _run_monitor(module: str, log: Path, tmp_path: Path) -> list[dict]:
    """`python -m MODULE` (an egress monitor) writing to `log`: refuse one CONNECT under a
    deny-all policy, stop it with SIGTERM, and return the records it wrote."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nnetwork:\n  approval:\n    mode: deny\n")
    sock = tmp_path / "egress.sock"
    argv = [
        sys.executable, "-m", module, "--sandbox", "sbx", "--socket", str(sock),
        "--policy", str(policy), "--admin-socket", str(tmp_path / "admin.sock"),
        "--audit-log", str(log),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        env=cli_env(tmp_path / "state", tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith(b"ready"), proc.stderr.read() if proc.stderr else ready
        assert b" 403 " in _connect(sock, "denied.example")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_launched_egress_proxy_writes_into_the_chain(tmp_path: Path) -> None:
    chain = tmp_path / "audit" / "audit.jsonl"
    ChainWriter(chain).append("sandbox.create", sandbox="sbx")  # another writer got there first
    recs = _run_monitor("appliance.control.egress_monitor", chain, tmp_path)
    events = [r["event"] for r in recs]
    assert events[0] == "sandbox.create" and events[1] == "egress.started"
    assert "egress.deny" in events and events[-1] == "egress.stopped"
    deny = recs[events.index("egress.deny")]
    assert deny["sandbox"] == "sbx" and deny["host"] == "denied.example"
    assert verify(chain).ok


def test_the_monitor_on_its_own_writes_plain_json_lines(tmp_path: Path) -> None:
    """`python -m sandbox.proxy.monitor` (no appliance): the same records, unchained."""
    recs = _run_monitor("sandbox.proxy.monitor", tmp_path / "egress.jsonl", tmp_path)
    events = [r["event"] for r in recs]
    assert events[0] == "egress.started" and events[-1] == "egress.stopped"
    assert "egress.deny" in events and all(r["sandbox"] == "sbx" for r in recs)
    assert not any("hash" in r or "seq" in r for r in recs)  # not the appliance's chain


def test_the_egress_monitor_requires_the_chain_path(tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "appliance.control.egress_monitor", "--socket", str(tmp_path / "s"),
        "--policy", str(tmp_path / "p.yaml"), "--admin-socket", str(tmp_path / "a"),
    ]  # fmt: skip
    proc = subprocess.run(
        argv, env=cli_env(tmp_path / "state", tmp_path), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "--audit-log" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tail_follow_prints_new_records_as_they_land(tmp_path: Path) -> None:
    state = tmp_path / "state"
    writer = ChainWriter(state / "audit" / "audit.jsonl")
    writer.append("before", n=0)
    appliance = str(Path(sys.executable).parent / "appliance")
    env = cli_env(state, tmp_path)
    argv = [appliance, "audit", "tail", "-n", "1", "--follow", "--json", "--event", "keep.*"]
    # `audit tail` reads through the control plane: --follow polls GET /api/v1/audit
    with running_control_plane(env, state):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watchdog = threading.Timer(60, proc.kill)  # a broken follow must fail, not hang
        watchdog.start()
        try:
            time.sleep(2.0)  # let it start and take its offset
            for n in range(1, 4):
                writer.append("keep.this", n=n)
                writer.append("skip.this", n=n)
            assert proc.stdout is not None
            got = [json.loads(proc.stdout.readline()) for _ in range(3)]
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            watchdog.cancel()
    assert [(r["event"], r["n"]) for r in got] == [("keep.this", n) for n in range(1, 4)]
    assert proc.returncode == 0 and b"Traceback" not in err
