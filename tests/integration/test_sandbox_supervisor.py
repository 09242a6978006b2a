"""The in-sandbox supervisor run for real on this host (tests/integration/supervisor_box.py):
Landlock, the egress forwarder, signals, reaping, refusals. Without the always-on keys
(runtime, checkin, agent_socket): test_supervisor_runtime.py covers those."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.supervisor_box import ABI, AGENT_UID, AS_ROOT, UNUSABLE, Box

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)


def test_landlock_confines_the_agent_and_the_report_says_so(box: Box) -> None:
    code, out, err = box.run("""
        import json, os, sys
        res = {}
        try:
            open(os.environ["SECRET"]).read(); res["secret"] = "read"
        except PermissionError: res["secret"] = "EACCES"
        try:
            open("/tmp/escape.txt", "w"); res["tmp_write"] = "written"
        except PermissionError: res["tmp_write"] = "EACCES"
        with open(os.path.join(os.environ["WS"], "out.txt"), "w") as f: f.write("hi")
        res["ws"] = open(os.path.join(os.environ["WS"], "out.txt")).read()
        res["uid"] = os.getuid()
        print(json.dumps(res)); sys.exit(7)
    """)
    assert code == 7, err
    assert json.loads(out) == {
        "secret": "EACCES",
        "tmp_write": "EACCES",
        "ws": "hi",
        "uid": AGENT_UID,
    }
    rep = box.report
    assert rep["landlock"]["enforced"] is True and rep["landlock"]["abi"] == ABI >= 1
    assert rep["supervisor_landlock"]["enforced"] is True
    assert "read_file" in rep["landlock"]["handled_fs"]
    assert ("truncate" in rep["landlock"]["handled_fs"]) == (ABI >= 3)
    assert (rep["landlock"]["handled_net"] == ["bind_tcp", "connect_tcp"]) == (ABI >= 4)
    assert rep["no_new_privs"] == 1 and rep["pid1_dumpable"] == 0
    assert rep["agent_uid"] == rep["pid1_uid"] == AGENT_UID and rep["agent_started"] is True
    assert int(rep["cap_eff"], 16) == 0 and int(rep["cap_prm"], 16) == 0
    assert rep["seccomp_mode"] in (0, 2)  # 2 under podman's filter; none outside it


def _echo_server(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o777)
    srv.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:  # read to EOF first: proves the forwarder passes the half-close through
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def test_forwarder_pipes_concurrent_connections_to_the_egress_socket(box: Box) -> None:
    srv = _echo_server(box.socket)
    try:
        code, out, err = box.run("""
            import os, socket, threading
            port, results = int(os.environ["PORT"]), {}
            def one(i):
                payload = bytes([i]) * (256 * 1024 + i)
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(payload); s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(65536): got += chunk
                results[i] = got == payload
            ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            [t.start() for t in ts]; [t.join() for t in ts]
            print(sorted(results.items()))
        """)
    finally:
        srv.close()
    assert code == 0, err
    assert out.strip() == str([(i, True) for i in range(8)])


@pytest.mark.skipif(ABI < 4, reason="Landlock TCP rules need ABI 4")
def test_landlock_net_blocks_other_tcp_ports(box: Box) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        code, out, err = box.run(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {other.getsockname()[1]}), timeout=2)
                print("connected")
            except PermissionError: print("EACCES")
        """)
    assert code == 0, err
    assert out.strip() == "EACCES"


@pytest.mark.skipif(ABI < 6, reason="Landlock signal scoping needs ABI 6")
def test_agent_cannot_signal_the_supervisor(box: Box) -> None:
    code, out, err = box.run("""
        import os
        try: os.kill(os.getppid(), 15); print("signalled")
        except PermissionError: print("EPERM")
    """)
    assert code == 0, err
    assert out.strip() == "EPERM"


def _wait_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie of someone else
    except FileNotFoundError:
        return True


def test_sigterm_reaches_the_agent_and_the_supervisor_exits(box: Box) -> None:
    proc = box.popen(
        box.config("""
        import os, time
        print(os.getpid(), flush=True); time.sleep(60)
    """)
    )
    agent = int(_wait_line(proc))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 2 and _gone(agent)


def test_an_agent_ignoring_sigterm_is_killed_after_the_grace(box: Box) -> None:
    proc = box.popen(
        box.config("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN); print("ready", flush=True); time.sleep(60)
    """)
    )
    assert _wait_line(proc) == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 128 + signal.SIGKILL


def _zombies_of(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def test_orphans_are_reaped_and_stragglers_stopped_when_the_agent_exits(box: Box) -> None:
    proc = box.popen(
        box.config("""
        import os, sys, time
        if os.fork() == 0:          # a middle process that orphans 5 short-lived grandchildren
            for _ in range(5):
                if os.fork() == 0:
                    time.sleep(0.2); os._exit(0)
            os._exit(0)
        os.wait()
        straggler = os.fork()       # outlives the agent, in its own session
        if straggler == 0:
            os.setsid(); time.sleep(60); os._exit(0)
        print(straggler, flush=True); time.sleep(1.5); sys.exit(3)
    """)
    )
    straggler = int(_wait_line(proc))
    time.sleep(0.8)  # the grandchildren have exited by now
    assert _zombies_of(proc.pid) == []
    assert proc.wait(timeout=5) == 3
    assert _gone(straggler)


def test_hard_requirement_refuses_to_start_the_agent(box: Box) -> None:
    marker = box.ws / "started"
    code, _out, err = box.run(f"open({str(marker)!r}, 'w')", min_abi=99)
    assert code == 3
    assert "hard_requirement" in err and not marker.exists()
    rep = box.report
    assert rep["agent_started"] is False and rep["landlock"]["enforced"] is False
    assert "99" in rep["landlock"]["error"]


def test_best_effort_starts_but_says_what_is_not_enforced(box: Box) -> None:
    fs = [
        {"path": "/usr", "access": ["read_file", "read_dir", "execute"]},
        {"path": "/does/not/exist", "access": ["read_file"]},
    ]
    code, out, err = box.run("print('ran')", compatibility="best_effort", min_abi=99, fs=fs)
    assert code == 0 and out.strip() == "ran"
    assert "WARNING" in err and "/does/not/exist" in err
    rep = box.report
    assert rep["landlock"]["enforced"] is True and rep["agent_started"] is True
    assert rep["landlock"]["skipped_paths"][0].startswith("/does/not/exist")


def test_a_missing_command_exits_127(box: Box) -> None:
    cfg = box.config("")
    data = json.loads(cfg.read_text())
    data["command"] = ["/usr/bin/no-such-agent"]
    cfg.write_text(json.dumps(data))
    proc = box.popen(cfg)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 127 and "no-such-agent" in err


def test_a_bad_config_exits_2(box: Box) -> None:
    cfg = box.config("")
    cfg.write_text(json.dumps({"command": "not a list"}))
    proc = box.popen(cfg)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "command" in err


@pytest.mark.skipif(not AS_ROOT, reason="needs root to show that root is refused")
def test_running_as_root_is_refused(box: Box) -> None:
    proc = box.popen(box.config("open('/tmp/should-not-run', 'w')"), as_agent=False)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "refusing to run as root" in err
    assert not (box.report_dir / "enforcement.json").exists()
