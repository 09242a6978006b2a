"""The egress proxy's command line and key file, stdlib only: the privileged monitor
(sandbox/proxy/monitor.py) parses the same flags without loading the proxy itself."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

DEFAULT_MAX_PENDING = 10  # pending approvals per sandbox (appliance: sandbox.max_pending_approvals)


def read_key(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"{path}: key file must be readable by its owner only (chmod 600)")
    key = path.read_text().strip()
    if not key:
        raise SystemExit(f"{path}: empty key file")
    return key


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sandbox.proxy", description="an egress proxy")
    p.add_argument("--socket", required=True, type=Path, help="the sandbox-facing unix socket")
    p.add_argument("--policy", type=Path, help="the sandbox's policy YAML")
    p.add_argument("--admin-socket", required=True, type=Path, help="host-only approvals API")
    p.add_argument("--sandbox", help="sandbox name (default: the policy file's stem)")
    p.add_argument("--gateway-url", help="where inference.local goes")
    p.add_argument("--key-file", type=Path, help="the sandbox's gateway key (mode 600)")
    p.add_argument("--audit-log", type=Path, help="append audit records here (default: stderr)")
    p.add_argument(
        "--socket-fd", type=int, help="serve this inherited, listening socket (bound at --socket)"
    )
    p.add_argument("--admin-fd", type=int, help="inherited, listening admin socket")
    p.add_argument("--privsep-fd", type=int, help="the link to a privileged monitor (privsep.py)")
    p.add_argument(
        "--max-pending", type=int, default=DEFAULT_MAX_PENDING, help="pending approvals at most"
    )
    args = p.parse_args(argv)
    if args.privsep_fd is not None:
        if args.policy or args.key_file or args.audit_log:
            p.error("with --privsep-fd, the monitor owns the policy, key and audit log")
        if args.socket_fd is None or args.admin_fd is None:
            p.error("--privsep-fd needs --socket-fd and --admin-fd")
        return args
    if args.policy is None:
        p.error("--policy is required")
    if bool(args.gateway_url) != bool(args.key_file):
        p.error("--gateway-url and --key-file go together")
    return args
