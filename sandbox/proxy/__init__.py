"""Host-side egress proxy: one unix socket per sandbox, allowlist, approvals, inference.local."""

from sandbox.proxy.addresses import is_forbidden, system_resolver
from sandbox.proxy.admin import AdminClient, AdminServer
from sandbox.proxy.approvals import ApprovalBroker, Pending, Verdict
from sandbox.proxy.audit import JsonLinesAudit, MemoryAudit
from sandbox.proxy.ports import AuditSink, InferenceRoute, PolicyWriter, Resolver
from sandbox.proxy.server import INFERENCE_HOST, EgressProxy
from sandbox.proxy.writer import FilePolicyWriter

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
