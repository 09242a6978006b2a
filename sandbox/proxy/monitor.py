"""A sandbox's egress proxy as the appliance runs it: privilege-separated.

    python -m appliance.control.egress_monitor <the flags of python -m sandbox.proxy>
        [--proxy-user USER]

(the appliance's entry point: this module's `main` with its hash-chained audit log as the sink;
`python -m sandbox.proxy.monitor` on its own appends plain JSON lines to --audit-log instead.)

This process (root, started by the control plane) is the monitor. It never reads the sandbox's
HTTP. It binds the egress and admin sockets (or takes the bound egress socket, --socket-fd),
reads the policy and the key, then starts `python -m sandbox.proxy` as --proxy-user (default
`nobody`) with no supplementary groups, no capabilities, no_new_privs and a parent-death signal,
handing it the listening sockets and one end of a socket pair (sandbox/proxy/privsep.py). The
proxy opens no file: over that link it gets the policy and key, and sends its audit records,
which this process writes. It cannot have an approval persisted: that is the control plane's,
on the operator's command (`appliance approvals approve ID --persist`), never on the proxy's word.

Why a monitor rather than a group-writable audit log: the chain is tamper-evident only against
someone who cannot rewrite both the log and its head (appliance/audit/); a proxy that could
append could also truncate, and one compromised proxy could then rewrite every sandbox's
history. Here only root processes ever open the chain, and the proxy can add records only for
its own sandbox and only `egress.*` events.

--audit-log is required and names the chain file (<state_dir>/audit/audit.jsonl). SIGHUP
re-reads the policy file and sends it to the proxy; SIGTERM/SIGINT stop the proxy, then this.
Imports stay light (the audit sink and sandbox.proxy.options are stdlib only; no pydantic):
one of these starts per sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sandbox.proxy.audit import JsonLinesAudit
from sandbox.proxy.options import parse_args as proxy_args
from sandbox.proxy.options import read_key
from sandbox.proxy.privsep import MAX_LINE, encode

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
STOP_GRACE_S = 5.0
PERSIST_REFUSED = (
    "approvals are persisted by the control plane (`appliance approvals approve ID --persist`),"
    " not by the proxy"
)
# What the proxy's environment keeps: nothing of the control plane's (tokens, config paths).
_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
PROG = "egress monitor"


class ClosingAuditSink(Protocol):
    """Where the monitor writes the proxy's records: the host's audit log (opened by path)."""

    def audit(self, event: str, **fields: Any) -> None: ...
    def close(self) -> None: ...


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, str]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--proxy-user", default="nobody")
    ours, rest = p.parse_known_args(argv)
    args = proxy_args(rest)
    if args.audit_log is None:
        raise SystemExit(f"{PROG}: --audit-log (the audit chain file) is required")
    if args.policy is None:
        raise SystemExit(f"{PROG}: --policy is required")
    return args, ours.proxy_user


def proxy_identity(user: str) -> tuple[int, int] | None:
    """(uid, gid) to run the proxy as; None when this process is not root (it cannot drop)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SystemExit(f"{PROG}: no user {user!r} (sandbox.proxy_user)") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise SystemExit(f"{PROG}: sandbox.proxy_user {user!r} is root")
    if _has_subids(pw.pw_name, pw.pw_uid):  # e.g. the service user: it owns the Podman socket
        raise SystemExit(
            f"{PROG}: sandbox.proxy_user {user!r} runs rootless containers "
            "(it has subordinate ids); the proxy needs a user that owns nothing"
        )
    return pw.pw_uid, pw.pw_gid


def _has_subids(name: str, uid: int) -> bool:
    try:
        lines = Path("/etc/subuid").read_text().splitlines()
    except OSError:
        return False
    return any(line.split(":", 1)[0] in (name, str(uid)) for line in lines)


def _child_setup() -> None:
    """preexec_fn: runs in the child after setgroups([])/setresgid/setresuid, before exec. The uid
    change from root already cleared the capability sets; no_new_privs keeps them empty across
    exec (no setuid binary, no file capabilities), and the proxy dies with its monitor."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        os._exit(126)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)


def listen_unix(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at `path` (replacing a stale one) with `mode`."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class Monitor:
    def __init__(self, args: argparse.Namespace, identity: tuple[int, int] | None) -> None:
        self.args = args
        self.name = args.sandbox or args.policy.stem
        self.identity = identity
        self.proc: subprocess.Popen[bytes] | None = None
        self.audit: ClosingAuditSink | None = None

    def spawn(self, link_fd: int) -> None:
        a = self.args
        egress = (
            socket.socket(fileno=a.socket_fd)
            if a.socket_fd is not None
            else listen_unix(a.socket, 0o666)  # its directory (the agent uid's) guards it
        )
        admin = listen_unix(a.admin_socket, 0o600)  # root's: no proxy can connect by path
        argv = [
            sys.executable, "-m", "sandbox.proxy", "--sandbox", self.name,
            "--socket", str(a.socket), "--socket-fd", str(egress.fileno()),
            "--admin-socket", str(a.admin_socket), "--admin-fd", str(admin.fileno()),
            "--privsep-fd", str(link_fd), "--max-pending", str(a.max_pending),
        ]  # fmt: skip
        if a.gateway_url:
            argv += ["--gateway-url", a.gateway_url]
        drop: dict[str, Any] = {}
        if self.identity is not None:
            uid, gid = self.identity
            drop = {"user": uid, "group": gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, cwd="/", env=env, close_fds=True,
                pass_fds=(egress.fileno(), admin.fileno(), link_fd),
                preexec_fn=_child_setup, **drop,
            )  # fmt: skip
        finally:
            egress.close()  # the proxy has its own copies
            admin.close()

    def hello(self) -> dict[str, Any]:
        a = self.args
        key = read_key(a.key_file) if a.key_file else None
        return {"hello": {"policy": a.policy.read_text(), "source": str(a.policy), "key": key}}

    async def run(self, parent: socket.socket, hello: dict[str, Any]) -> int:
        assert self.proc is not None
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_LINE)
        writer.write(encode(hello))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._reload, writer)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        try:
            while line := await reader.readline():
                await self._handle(json.loads(line), writer)
        except (ValueError, asyncio.LimitOverrunError, ConnectionError) as exc:
            reason = f"bad message from the proxy: {exc!r}"
            self._record("egress.monitor_error", {"sandbox": self.name, "reason": reason})
            self._stop()
        writer.close()
        return await asyncio.to_thread(self._wait)

    async def _handle(self, message: Any, writer: asyncio.StreamWriter) -> None:
        if not isinstance(message, dict):
            raise ValueError("not an object")
        if "audit" in message:
            event, fields = message["audit"], message.get("fields")
            if not isinstance(event, str) or not event.startswith("egress."):
                raise ValueError(f"event {event!r} is not the proxy's to record")
            if not isinstance(fields, dict):
                raise ValueError("fields are not an object")
            self._record(event, {**fields, "sandbox": self.name})
        elif "persist" in message:
            # Never on the proxy's word: it is unprivileged, may be compromised, and serves the
            # admin socket itself, so a rule written here would outlive it unasked. The control
            # plane persists what the operator approved (SandboxManager.persist_approval).
            self._record("egress.persist_refused", {"sandbox": self.name})
            writer.write(encode({"reply": message["persist"], "error": PERSIST_REFUSED}))

    def _record(self, event: str, fields: dict[str, Any]) -> None:
        """One dict, not keywords: a proxy's field named `event` or `self` would collide with
        the sink's parameters (TypeError, and the monitor would exit). Kept, renamed `name_`,
        as the chain keeps its own reserved names (appliance/audit/)."""
        assert self.audit is not None
        safe = {f"{k}_" if k in ("event", "self") else k: v for k, v in fields.items()}
        self.audit.audit(event, **safe)

    def _reload(self, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(encode({"policy": self.args.policy.read_text()}))
        except OSError as exc:
            self._record("egress.reload_failed", {"sandbox": self.name, "reason": str(exc)})

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def _wait(self) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def cleanup(self) -> None:
        for path in (self.args.admin_socket, self.args.socket):
            with contextlib.suppress(OSError):
                path.unlink()
        if self.audit is not None:
            self.audit.close()


def main(
    argv: list[str] | None = None,
    open_audit: Callable[[Path], ClosingAuditSink] = JsonLinesAudit.open,
) -> None:
    """Run the monitor; `open_audit` opens the sink for --audit-log (the appliance passes its
    hash-chained log; on its own, plain JSON lines)."""
    args, user = parse_args(argv if argv is not None else sys.argv[1:])
    identity = proxy_identity(user)  # a bad policy: the proxy says so (file:line) and exits
    monitor = Monitor(args, identity)
    hello = monitor.hello()  # the key is read (and checked) before anything starts
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        monitor.spawn(child.fileno())  # before any thread starts: preexec_fn forks
    finally:
        child.close()
    monitor.audit = open_audit(args.audit_log)
    try:
        code = asyncio.run(monitor.run(parent, hello))
    finally:
        monitor.cleanup()
    raise SystemExit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
