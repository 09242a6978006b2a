"""One sandbox's egress proxy as a host process (the control plane runs one per sandbox).

    python -m sandbox.proxy --socket PATH --policy POLICY.yaml --admin-socket PATH
        [--sandbox NAME] [--gateway-url URL --key-file FILE] [--audit-log FILE]
        [--max-pending N]

The key comes from a file only the host user can read, never argv (argv shows in `ps`).
SIGHUP reloads the network rules from the policy file; SIGTERM/SIGINT stop.
Run this way, decisions go to --audit-log as plain JSON lines.

The appliance runs it privilege-separated instead: sandbox/proxy/monitor.py (root) binds the
sockets, then starts this module as an unprivileged user with `--privsep-fd FD --socket-fd FD
--admin-fd FD` and no --policy/--key-file: policy, key, reloads, audit records and persisted
approvals all go over the link to the monitor (sandbox/proxy/privsep.py), so this process opens
no file at all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
from collections.abc import Callable

from sandbox.policy import Network, load_policy, parse_policy
from sandbox.proxy.admin import AdminServer
from sandbox.proxy.approvals import ApprovalBroker
from sandbox.proxy.audit import JsonLinesAudit
from sandbox.proxy.options import parse_args, read_key
from sandbox.proxy.ports import AuditSink, InferenceRoute, PolicyWriter
from sandbox.proxy.privsep import MonitorLink, not_dumpable
from sandbox.proxy.server import EgressProxy
from sandbox.proxy.writer import FilePolicyWriter
from sandbox.yamlfile import YamlError

SinkFactory = Callable[[argparse.Namespace], AuditSink]


def jsonl_sink(args: argparse.Namespace) -> AuditSink:
    return JsonLinesAudit.open(args.audit_log) if args.audit_log else JsonLinesAudit()


def _inherited(fd: int | None) -> socket.socket | None:
    return None if fd is None else socket.socket(fileno=fd)


async def serve(args: argparse.Namespace, audit: AuditSink) -> None:
    policy = load_policy(args.policy)
    route = InferenceRoute(args.gateway_url, read_key(args.key_file)) if args.gateway_url else None
    writer = FilePolicyWriter(args.policy)
    name = args.sandbox or args.policy.stem

    def reload() -> None:
        try:
            proxy.update_network(load_policy(args.policy).network)
        except (OSError, YamlError) as exc:  # keep the rules we have rather than none
            audit.audit("egress.reload_failed", sandbox=name, reason=str(exc))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    proxy = _proxy(args, name, policy.network, route, writer, audit)
    await _run(args, name, proxy, audit, stop)


async def serve_privsep(args: argparse.Namespace) -> None:
    """The privilege-separated proxy: everything but the sockets comes over the monitor link."""
    not_dumpable()  # before the key is held in memory: it comes in the monitor's hello
    link, hello = await MonitorLink.open(args.privsep_fd)
    name = args.sandbox or "sandbox"
    source = str(hello.get("source") or f"{name} policy")  # errors name file:line
    policy = parse_policy(str(hello["policy"]), source)
    key = hello.get("key")
    route = InferenceRoute(args.gateway_url, str(key)) if args.gateway_url and key else None

    def reload(text: str) -> None:
        try:
            proxy.update_network(parse_policy(text, source).network)
        except YamlError as exc:  # keep the rules we have rather than none
            link.audit("egress.reload_failed", sandbox=name, reason=str(exc))

    proxy = _proxy(args, name, policy.network, route, link, link)
    link.start(reload)
    try:
        await _run(args, name, proxy, link, link.closed)
    finally:
        await link.close()


def _proxy(
    args: argparse.Namespace,
    name: str,
    network: Network,
    route: InferenceRoute | None,
    writer: PolicyWriter,
    audit: AuditSink,
) -> EgressProxy:
    broker = ApprovalBroker(writer=writer, audit=audit, max_pending=args.max_pending)
    return EgressProxy(
        name,
        args.socket,
        network,
        approvals=broker,
        audit=audit,
        inference=route,
        listen_sock=_inherited(args.socket_fd),
    )


async def _run(
    args: argparse.Namespace, name: str, proxy: EgressProxy, audit: AuditSink, stop: asyncio.Event
) -> None:
    admin = AdminServer(proxy.approvals, args.admin_socket, _inherited(args.admin_fd))
    loop = asyncio.get_running_loop()
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
    if args.privsep_fd is not None:
        try:
            asyncio.run(serve_privsep(args))
        except YamlError as exc:
            raise SystemExit(str(exc)) from None
        return
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
