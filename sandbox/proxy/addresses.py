"""SSRF guard: which resolved addresses a sandbox may reach without `allow_private`."""

from __future__ import annotations

import asyncio
import ipaddress
import socket


def is_forbidden(ip: str) -> bool:
    """Private, loopback, link-local, multicast, unspecified, reserved, or not globally routable."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and friends reach the IPv4 target: judge that target.
        inner = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if inner is not None and is_forbidden(str(inner)):
            return True
    return (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_reserved
        or not addr.is_global
    )


def ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's resolver (the sandbox has no DNS of its own)."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        if ip not in seen:
            seen.append(ip)
    return seen
