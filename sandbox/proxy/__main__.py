"""One sandbox's egress proxy as a host process (the control plane runs one per sandbox).

    python -m sandbox.proxy --socket PATH --policy POLICY.yaml --admin-socket PATH
        [--sandbox NAME] [--gateway-url URL --key-file FILE] [--audit-log FILE]

The key comes from a file only the host user can read, never argv (argv shows in `ps`).
SIGHUP reloads the network rules from the policy file; SIGTERM/SIGINT stop.
Run this way, decisions go to --audit-log as plain JSON lines; the appliance launches the proxy
through appliance/egress_main.py, which passes `main` its hash-chained audit log as the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from sandbox.policy import load_policy
from sandbox.proxy.admin import AdminServer
from sandbox.proxy.approvals import ApprovalBroker
from sandbox.proxy.audit import JsonLinesAudit
from sandbox.proxy.ports import AuditSink, InferenceRoute
from sandbox.proxy.server import EgressProxy
from sandbox.proxy.writer import FilePolicyWriter
from sandbox.yamlfile import YamlError


def read_key(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"{path}: key file must be readable by its owner only (chmod 600)")
    key = path.read_text().strip()
    if not key:
        raise SystemExit(f"{path}: empty key file")
    return key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sandbox.proxy", description=__doc__.split("\n")[1])
    p.add_argument("--socket", required=True, type=Path, help="the sandbox-facing unix socket")
    p.add_argument("--policy", required=True, type=Path, help="the sandbox's policy YAML")
    p.add_argument("--admin-socket", required=True, type=Path, help="host-only approvals API")
    p.add_argument("--sandbox", help="sandbox name (default: the policy file's stem)")
    p.add_argument("--gateway-url", help="where inference.local goes")
    p.add_argument("--key-file", type=Path, help="the sandbox's gateway key (mode 600)")
    p.add_argument("--audit-log", type=Path, help="append audit records here (default: stderr)")
    p.add_argument(
        "--socket-fd", type=int, help="serve this inherited, listening socket (bound at --socket)"
    )
    args = p.parse_args(argv)
    if bool(args.gateway_url) != bool(args.key_file):
        p.error("--gateway-url and --key-file go together")
    return args


SinkFactory = Callable[[argparse.Namespace], AuditSink]


def jsonl_sink(args: argparse.Namespace) -> AuditSink:
    return JsonLinesAudit.open(args.audit_log) if args.audit_log else JsonLinesAudit()


async def serve(args: argparse.Namespace, audit: AuditSink) -> None:
    policy = load_policy(args.policy)
    route = InferenceRoute(args.gateway_url, read_key(args.key_file)) if args.gateway_url else None
    broker = ApprovalBroker(writer=FilePolicyWriter(args.policy), audit=audit)
    name = args.sandbox or args.policy.stem
    listen = None if args.socket_fd is None else socket.socket(fileno=args.socket_fd)
    proxy = EgressProxy(
        name,
        args.socket,
        policy.network,
        approvals=broker,
        audit=audit,
        inference=route,
        listen_sock=listen,
    )
    admin = AdminServer(broker, args.admin_socket)
    stop = asyncio.Event()

    def reload() -> None:
        try:
            proxy.update_network(load_policy(args.policy).network)
        except (OSError, YamlError) as exc:  # keep the rules we have rather than none
            audit.audit("egress.reload_failed", sandbox=name, reason=str(exc))

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    await admin.start()
    audit.audit("egress.started", sandbox=name, pid=os.getpid(), socket=str(args.socket))
    print(f"ready {args.socket}", flush=True)  # the control plane waits for this line
    try:
        await stop.wait()
    finally:
        await admin.close()
        await proxy.close()
        audit.audit("egress.stopped", sandbox=name, pid=os.getpid())


def main(argv: list[str] | None = None, sink: SinkFactory = jsonl_sink) -> None:
    """`sink` builds the audit sink from the parsed flags; it is closed (flushed) on the way out."""
    args = parse_args(argv)
    audit = sink(args)
    try:
        asyncio.run(serve(args, audit))
    except YamlError as exc:
        raise SystemExit(str(exc)) from None
    finally:
        close = getattr(audit, "close", None)
        if callable(close):
            close()


if __name__ == "__main__":
    main()
