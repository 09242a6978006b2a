"""Host-side egress proxy: one unix socket per sandbox, allowlist, approvals, inference.local.

The names below load on first use (PEP 562), so that `sandbox.proxy.options` and
`sandbox.proxy.privsep` can be imported by the privileged monitor without the proxy itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.proxy.addresses import is_forbidden, system_resolver
    from sandbox.proxy.admin import AdminServer
    from sandbox.proxy.admin_client import AdminClient
    from sandbox.proxy.approvals import ApprovalBroker, Pending, Verdict
    from sandbox.proxy.audit import JsonLinesAudit, MemoryAudit
    from sandbox.proxy.ports import AuditSink, InferenceRoute, PolicyWriter, Resolver
    from sandbox.proxy.server import INFERENCE_HOST, EgressProxy
    from sandbox.proxy.writer import FilePolicyWriter

_WHERE = {
    "INFERENCE_HOST": "server",
    "AdminClient": "admin_client",
    "AdminServer": "admin",
    "ApprovalBroker": "approvals",
    "AuditSink": "ports",
    "EgressProxy": "server",
    "FilePolicyWriter": "writer",
    "InferenceRoute": "ports",
    "JsonLinesAudit": "audit",
    "MemoryAudit": "audit",
    "Pending": "approvals",
    "PolicyWriter": "ports",
    "Resolver": "ports",
    "Verdict": "approvals",
    "is_forbidden": "addresses",
    "system_resolver": "addresses",
}
__all__ = [
    "INFERENCE_HOST",
    "AdminClient",
    "AdminServer",
    "ApprovalBroker",
    "AuditSink",
    "EgressProxy",
    "FilePolicyWriter",
    "InferenceRoute",
    "JsonLinesAudit",
    "MemoryAudit",
    "Pending",
    "PolicyWriter",
    "Resolver",
    "Verdict",
    "is_forbidden",
    "system_resolver",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sandbox.proxy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sandbox.proxy.{_WHERE[name]}"), name)
