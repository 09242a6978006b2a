"""Operators: the people (and scripts) that use the control plane's loopback port, each with a
role and a token.

Tokens are made like inference keys: `sk-op-` + 32 random bytes (urlsafe), shown once and stored
only as their SHA-256, so the store can check a token but never give one back. The `sk-` prefix
makes the audit log's secret rule redact one wherever it might appear. Names follow the one name
rule (sandbox/names.py, via store/names.py), checked before anything is written.

Socket peers need no token (the socket's mode makes them admins); tokens are for the port.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.errors import ConfigError, NotFoundError
from appliance.store.db import DB_NAME, connect, open_store
from appliance.store.names import OperatorExistsError, check_operator_name

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each may do what the ones before may
TOKEN_PREFIX = "sk-op-"
_COLUMNS = "name, role, created_at, revoked_at"


class AuditSink(Protocol):
    def audit(self, event: str, **fields: Any) -> None: ...


@dataclass(frozen=True)
class Operator:
    name: str
    role: Role
    created_at: float
    revoked_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "state": "revoked" if self.revoked_at else "live",
        }


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}", hint=f"roles: {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def _operator(row: tuple[Any, ...]) -> Operator:
    return Operator(name=row[0], role=row[1], created_at=row[2], revoked_at=row[3])


class OperatorService:
    """Create, list, revoke and authenticate operators in <state_dir>/appliance.db.

    One connection shared by the API's worker threads, serialised by a lock: operators are few
    and each call is one small statement. Create and revoke append their audit record inside
    the transaction, so neither happens unrecorded."""

    def __init__(self, state_dir: Path, audit: AuditSink) -> None:
        open_store(state_dir).close()  # creates and migrates the database once
        self.path = state_dir / DB_NAME
        self._audit = audit
        self._lock = threading.Lock()
        self._conn = connect(self.path, any_thread=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create(self, name: str, role: str, actor: Mapping[str, Any]) -> tuple[Operator, str]:
        """A new live operator and its token (returned this once)."""
        check_operator_name(name)
        operator = Operator(name=name, role=check_role(role), created_at=time.time())
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            try:
                with self._conn:
                    self._conn.execute(
                        "INSERT INTO operators (name, role, token_sha256, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (name, operator.role, hash_token(token), operator.created_at),
                    )
                    self._audit.audit("operator.created", name=name, role=role, **actor)
            except sqlite3.IntegrityError:
                raise OperatorExistsError(
                    f"a live operator named {name!r} already exists"
                ) from None
        return operator, token

    def list(self, include_revoked: bool = True) -> list[Operator]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM operators{where} ORDER BY created_at, id"
            ).fetchall()
        return [_operator(r) for r in rows]

    def revoke(self, name: str, actor: Mapping[str, Any]) -> Operator:
        """Revoke the live operator `name`: its token stops working with the next request."""
        now = time.time()
        with self._lock, self._conn:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM operators WHERE name = ? AND revoked_at IS NULL",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no live operator named {name!r}",
                    hint="`appliance operators list` shows the operators",
                )
            self._conn.execute(
                "UPDATE operators SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            )
            self._audit.audit("operator.revoked", name=name, **actor)
        return Operator(name=row[0], role=row[1], created_at=row[2], revoked_at=now)

    def authenticate(self, token: str) -> Operator | None:
        """The live operator holding `token`, or None (unknown, malformed or revoked)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            return None
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM operators WHERE token_sha256 = ? AND revoked_at IS NULL",
                (hash_token(token),),
            ).fetchone()
        return None if row is None else _operator(row)
