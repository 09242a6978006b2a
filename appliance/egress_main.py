"""A sandbox's egress proxy as the appliance runs it: `sandbox.proxy`'s main, auditing into the
host's hash-chained audit log instead of plain JSON lines.

    python -m appliance.egress_main <the flags of python -m sandbox.proxy>

--audit-log is required here and names the chain file (<state_dir>/audit/audit.jsonl). Records go
through a writer thread, so the proxy's event loop never waits on the log's lock or fsync.
Imports stay light (the chain writer is stdlib only): one of these starts per sandbox.
"""

from __future__ import annotations

import argparse
import sys

from appliance.audit import BackgroundAudit, ChainWriter
from sandbox.proxy.__main__ import main as proxy_main
from sandbox.proxy.ports import AuditSink


def chain_sink(args: argparse.Namespace) -> AuditSink:
    if args.audit_log is None:
        raise SystemExit("appliance.egress_main: --audit-log (the audit chain file) is required")
    return BackgroundAudit(ChainWriter(args.audit_log))


def main(argv: list[str] | None = None) -> None:
    proxy_main(argv if argv is not None else sys.argv[1:], sink=chain_sink)


if __name__ == "__main__":
    main()
