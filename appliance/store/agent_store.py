"""Agents in the state store: the blueprint each runs (with its digest, and the blueprint itself
as deployed), deployment history for upgrade and rollback, and turn activity. An agent's sandbox
has the agent's name."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, get_args

from appliance.store.db import Store

# catalog: resolved by name@version | client: YAML text a client sent, kept in blueprint_json
Origin = Literal["catalog", "client"]
ORIGINS: tuple[Origin, ...] = get_args(Origin)


@dataclass(frozen=True)
class Deployment:
    id: int
    agent: str
    blueprint: str
    version: str
    digest: str
    image: str
    outcome: str  # active | replaced
    reason: str
    created_at: float
    origin: Origin
    blueprint_json: str | None  # the canonical blueprint as deployed (None before migration 8)

    @property
    def ref(self) -> str:
        return f"{self.blueprint}@{self.version}"


_COLUMNS = (
    "id, agent, blueprint, version, digest, image, outcome, reason, created_at, "
    "origin, blueprint_json"
)


class AgentStore:
    def __init__(self, store: Store) -> None:
        self.conn = store.conn

    def deploy(
        self,
        agent: str,
        blueprint: str,
        version: str,
        digest: str,
        image: str,
        reason: str,
        *,
        origin: Origin = "catalog",
        blueprint_json: str | None = None,
    ) -> int:
        """Record a new active deployment; the previous active one becomes `replaced`. A
        `client` deployment carries its blueprint: nothing else can give it back."""
        if origin not in ORIGINS:
            raise ValueError(f"origin {origin!r}: one of {', '.join(ORIGINS)}")
        if origin == "client" and blueprint_json is None:
            raise ValueError("a client's blueprint is deployed with its blueprint_json")
        with self.conn:
            self.conn.execute(
                "UPDATE agent_deployments SET outcome = 'replaced' "
                "WHERE agent = ? AND outcome = 'active'",
                (agent,),
            )
            cur = self.conn.execute(
                f"INSERT INTO agent_deployments ({_COLUMNS}) "
                "VALUES (NULL, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (
                    agent,
                    blueprint,
                    version,
                    digest,
                    image,
                    reason,
                    time.time(),
                    origin,
                    blueprint_json,
                ),
            )
        return int(cur.lastrowid or 0)

    def history(self, agent: str) -> list[Deployment]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM agent_deployments WHERE agent = ? ORDER BY id", (agent,)
        ).fetchall()
        return [Deployment(*row) for row in rows]

    def current(self, agent: str) -> Deployment | None:
        active = [d for d in self.history(agent) if d.outcome == "active"]
        return active[-1] if active else None

    def previous(self, agent: str) -> Deployment | None:
        """The deployment before the current one that did not fail: what rollback returns to."""
        history = self.history(agent)
        current = self.current(agent)
        earlier = [
            d for d in history if d.outcome == "replaced" and (current is None or d.id < current.id)
        ]
        return earlier[-1] if earlier else None

    def agents(self) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT agent FROM agent_deployments WHERE outcome = 'active' ORDER BY agent"
        ).fetchall()
        return [r[0] for r in rows]

    def forget(self, agent: str) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE agent_deployments SET outcome = 'replaced' "
                "WHERE agent = ? AND outcome = 'active'",
                (agent,),
            )
            self.conn.execute("DELETE FROM agent_activity WHERE agent = ?", (agent,))

    def record_turn(self, agent: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO agent_activity (agent, last_turn, turns) VALUES (?, ?, 1) "
                "ON CONFLICT (agent) DO UPDATE SET last_turn = excluded.last_turn, "
                "turns = turns + 1",
                (agent, time.time()),
            )

    def activity(self, agent: str) -> tuple[float | None, int]:
        row = self.conn.execute(
            "SELECT last_turn, turns FROM agent_activity WHERE agent = ?", (agent,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, 0)
