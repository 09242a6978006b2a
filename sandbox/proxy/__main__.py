"""One sandbox's egress proxy as a host process (the control plane runs one per sandbox).

    python -m sandbox.proxy --socket PATH --policy POLICY.yaml --admin-socket PATH
        [--sandbox NAME] [--gateway-url URL --key-file FILE] [--audit-log FILE]

The key comes from a file only the host user can read, never argv (argv shows in `ps`).
SIGHUP reloads the network rules from the policy file; SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

from sandbox.policy import load_policy
from sandbox.proxy.admin import AdminServer
from sandbox.proxy.approvals import ApprovalBroker
from sandbox.proxy.audit import JsonLinesAudit
from sandbox.proxy.ports import InferenceRoute
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
    p.add_argument("--audit-log", type=Path, help="append JSON lines here (default: stderr)")
    args = p.parse_args(argv)
    if bool(args.gateway_url) != bool(args.key_file):
        p.error("--gateway-url and --key-file go together")
    return args


async def serve(args: argparse.Namespace) -> None:
    policy = load_policy(args.policy)
    audit_stream = args.audit_log.open("a") if args.audit_log else sys.stderr
    audit = JsonLinesAudit(audit_stream)
    route = InferenceRoute(args.gateway_url, read_key(args.key_file)) if args.gateway_url else None
    broker = ApprovalBroker(writer=FilePolicyWriter(args.policy), audit=audit)
    name = args.sandbox or args.policy.stem
    proxy = EgressProxy(
        name, args.socket, policy.network, approvals=broker, audit=audit, inference=route
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


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(serve(parse_args(argv)))
    except YamlError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
