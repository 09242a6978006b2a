"""Who is calling, and may they: auth as FastAPI dependencies (as vLLM's entrypoints do).

Two ways in. The unix socket (mode 0660, group `appliance-admin`): the kernel tells us the peer's
uid and pid (SO_PEERCRED, read by server.py when the connection is accepted); whoever can connect
is root or in the admin group, so is an admin. The loopback port: an operator token
(`Authorization: Bearer …`) with its role, or the web console's session cookie (its operator;
X-CSRF-Token for a method that may change something). Anything else is 401; a role too low 403.

All of them are `async`: a sync dependency runs in anyio's shared thread pool, which forty slow
sync routes (creates, upgrades) can fill, and then even `POST /kill` would wait to be let in. A
socket peer needs no I/O; a token's lookup (one indexed SELECT) runs on a lane of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, HTTPException, Request

from appliance.control.api import lanes
from appliance.control.operators import ROLES, Role
from appliance.control.plane import ControlPlane


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    loginuid: int | None = None  # /proc/<pid>/loginuid: who logged in, kept across sudo

    def principal(self) -> Principal:
        """A socket peer is an admin (the socket's mode let it connect)."""
        return Principal(
            "unix", f"uid:{self.uid}", "admin", self.uid, self.pid, loginuid=self.loginuid
        )


@dataclass(frozen=True)
class Principal:
    # "link": a one-tap approval link (appliance/control/one_tap.py), name "webhook:<hook>"
    kind: Literal["unix", "token", "system", "link", "console"]
    # "uid:0" for a socket peer, the operator's name for a token; "scheduler" (etc.) for the
    # control plane acting on its own (kind "system": no request behind it)
    name: str
    role: Role
    uid: int | None = None
    pid: int | None = None
    loginuid: int | None = None  # a socket peer's login uid: the user behind `sudo`

    def audit_fields(self) -> dict[str, Any]:
        """Who did it, as the audit log records every mutation."""
        fields: dict[str, Any] = {"actor": self.name, "actor_kind": self.kind}
        if self.uid is not None:
            fields["actor_uid"] = self.uid
        if self.pid is not None:
            fields["actor_pid"] = self.pid
        if self.loginuid is not None:
            fields["actor_loginuid"] = self.loginuid
        return fields


async def get_plane(request: Request) -> ControlPlane:
    return request.app.state.plane


async def _console_session(request: Request) -> Principal:
    """No bearer token: the web console's session cookie, if the console is mounted (it sets
    app.state.session_principal; for a method that may change something it also wants the
    session's X-CSRF-Token header, else 403), else 401."""
    by_session = getattr(request.app.state, "session_principal", None)
    who = await by_session(request) if by_session is not None else None
    if who is None:
        raise HTTPException(401, "an operator token is required (Authorization: Bearer …)")
    return who


async def principal(request: Request) -> Principal:
    peer = request.scope.get("state", {}).get("peer")
    if isinstance(peer, PeerCred):
        who = peer.principal()
    else:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            who = await _console_session(request)
        else:
            plane: ControlPlane = request.app.state.plane
            operator = await lanes.AUTH.run(plane.authenticate_operator, token.strip())
            if operator is None:
                raise HTTPException(401, "unknown or revoked operator token")
            who = Principal("token", operator.name, operator.role)
    request.state.principal = who  # for the audit trail (api/audit_trail.py)
    return who


def require(role: Role) -> Callable[..., Principal]:
    async def check(who: Principal = Depends(principal)) -> Principal:
        if ROLES.index(who.role) < ROLES.index(role):
            raise HTTPException(403, f"{who.name} is a {who.role}; this needs {role}")
        return who

    return check


# The three dependencies routers use: `who: Principal = Viewer` etc.
Viewer = Depends(require("viewer"))
Operator = Depends(require("operator"))
Admin = Depends(require("admin"))
Plane = Depends(get_plane)
