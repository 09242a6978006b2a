"""The egress decision: explicit deny, allow rules, session approvals, then the approval mode."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.policy import Endpoint, Network, _path_match
from sandbox.proxy.paths import without_params


@dataclass(frozen=True)
class Rule:
    """What the rules alone say; `unknown` means no rule names the host (approval applies)."""

    verdict: str  # "allow" | "deny" | "unknown"
    reason: str
    allow_private: bool = False


def _denied_by(e: Endpoint, host: str, port: int, method: str | None, path: str | None) -> bool:
    # Deny rules match on host+port; for plain HTTP their path globs narrow them (methods do not).
    # `path` is normalised (sandbox/proxy/paths.py). Deny globs compare ASCII-case-insensitively:
    # many servers serve /SECRET as /secret, and a deny must win. Allow globs stay exact. A deny
    # also judges the path without its `;parameters` (Tomcat routes `/secret;x` as `/secret`).
    if not e.matches_host(host, port):
        return False
    if method is None or path is None:
        return True
    bare = _ascii_lower(path.split("?", 1)[0] or "/")
    forms = {bare, without_params(bare)}
    return any(_path_match(form, _ascii_lower(glob)) for glob in e.paths for form in forms)


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_LOWER)


def evaluate(
    network: Network, host: str, port: int, method: str | None = None, path: str | None = None
) -> Rule:
    """`method`/`path` are None for CONNECT (the tunnel is opaque: host and port only)."""
    for e in network.deny:
        if _denied_by(e, host, port, method, path):
            return Rule("deny", f"{host}:{port} is denied by policy ({e.host})")
    matched = [e for e in network.allow if e.matches_host(host, port)]
    if not matched:
        return Rule("unknown", f"{host}:{port} is not in the policy")
    if method is not None and path is not None:
        matched = [e for e in matched if e.allows_request(method, path)]
        if not matched:
            return Rule("deny", f"{method} {path.split('?', 1)[0]} on {host} is not allowed")
    return Rule("allow", "allowed by policy", any(e.allow_private for e in matched))
