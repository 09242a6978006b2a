"""The egress proxy's privileged monitor as the appliance runs it, one per sandbox:

    python -m appliance.control.egress_monitor <the flags of sandbox/proxy/monitor.py>

sandbox/proxy/monitor.py does the work; here it gets the appliance's hash-chained audit log as
its sink (written on a background thread, so the proxy's event loop never waits for the disk).
The lifecycle starts it (LifecycleSettings.monitor_argv, set in appliance/control/wiring.py).
Imports stay light: the chain writer is stdlib only.
"""

from __future__ import annotations

from pathlib import Path

from appliance.audit import BackgroundAudit, ChainWriter
from sandbox.proxy.monitor import main


def open_chain(path: Path) -> BackgroundAudit:
    return BackgroundAudit(ChainWriter(path))


if __name__ == "__main__":
    main(open_audit=open_chain)
