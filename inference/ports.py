"""What the inference package needs from the rest of the appliance, declared here as Protocols.

The appliance implements them (appliance/store) and hands them in; inference never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

OwnerKind = Literal["client", "sandbox"]
Scope = Literal["metrics"]  # what a key may do beyond /v1 (GET /metrics)
SCOPES: tuple[Scope, ...] = ("metrics",)
# A ledger row's life: `open` from admission (holding its reservation) until settled as `ok`,
# `error` (backend or gateway failed after admission), `cancelled` (the client hung up) or
# `interrupted` (the gateway died; settled by the next start). `refused`: turned away before
# admission (bad body, model not allowed, budget), never reserved anything.
LedgerState = Literal["open", "ok", "error", "cancelled", "interrupted", "refused"]


@dataclass(frozen=True)
class KeyRecord:
    id: str  # public id, e.g. "key_3f9a..." (never the secret)
    name: str
    owner_kind: OwnerKind
    created_at: float
    revoked_at: float | None = None
    # Model names the key may request (resolved through the gateway's aliases); None: any.
    allowed_models: tuple[str, ...] | None = None
    scopes: tuple[Scope, ...] = ()  # e.g. ("metrics",): may scrape GET /metrics


@dataclass(frozen=True)
class UsageRecord:
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: int  # HTTP status returned to the client
    stream: bool
    cost: float = 0.0  # from the price table; 0 for local models
    ts: float = 0.0
    state: LedgerState | None = None  # None: `ok` for status 200, else `error`
    request_id: str | None = None


@dataclass(frozen=True)
class Reservation:
    """What an admitted request may spend at most, held by its `open` ledger row until settled.
    Upper bounds: the prompt's from the body's size, the completion's from max_tokens (capped
    by the budget) or the model's context, times the choices asked for."""

    request_id: str
    key_id: str
    model: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    cost: float
    ts: float  # admission time: the row's day and month
    owner: str  # the gateway process holding it (see Ledger.interrupt_open)


@dataclass(frozen=True)
class Settlement:
    """The real usage of an admitted request; replaces its reservation."""

    request_id: str
    key_id: str
    model: str  # the model that answered (the fallback's, when it did)
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_s: float
    status: int
    state: LedgerState
    ts: float  # the reservation's (admission) time: the spend lands in that day


@dataclass(frozen=True)
class Budget:
    key_id: str
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_cost: float | None = None
    monthly_cost: float | None = None


@dataclass(frozen=True)
class Spend:
    """What a key has spent in the current day and month (UTC)."""

    day_tokens: int = 0
    month_tokens: int = 0
    day_cost: float = 0.0
    month_cost: float = 0.0


class KeyStore(Protocol):
    def create_key(
        self,
        name: str,
        owner_kind: OwnerKind,
        allowed_models: Sequence[str] | None = None,
        scopes: Sequence[Scope] = (),
    ) -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the secret, shown once and stored only hashed.
        `allowed_models` None: the key may use any model."""
        ...

    def authenticate(self, secret: str) -> KeyRecord | None:
        """The live (not revoked) key with this secret, or None."""
        ...

    def list_keys(self) -> list[KeyRecord]: ...

    def revoke_key(self, key_id_or_name: str) -> KeyRecord | None: ...


class Ledger(Protocol):
    def record_usage(self, usage: UsageRecord) -> None: ...

    def record_usages(self, usages: Sequence[UsageRecord]) -> None:
        """Write a batch in one transaction (the gateway's writer thread batches)."""
        ...

    def spend(self, key_id: str, now: float | None = None) -> Spend:
        """Settled usage only (reservations excluded)."""
        ...

    def reserve(
        self,
        key_id: str,
        now: float,
        decide: Callable[[Spend, Spend], Reservation | None],
        needs_spend: bool = True,
    ) -> Reservation | None:
        """In one transaction that no other admission (in any process) interleaves with: call
        `decide(settled, reserved)` with the key's settled spend and its open reservations (zero
        when not `needs_spend`: a key without a budget), and write the Reservation it returns as
        an `open` row (None: nothing is written)."""
        ...

    def settle(self, settlements: Sequence[Settlement]) -> None:
        """Close open rows with their real usage and add it to the spend, in one transaction."""
        ...

    def interrupt_open(self, alive: Callable[[str], bool]) -> int:
        """Settle every open row whose owner is not `alive` as `interrupted`, charged its
        reservation; returns how many. Called when a gateway starts."""
        ...


class BudgetStore(Protocol):
    def get_budget(self, key_id: str) -> Budget | None: ...

    def set_budget(self, budget: Budget) -> None: ...

    def mark_budget_event(self, key_id: str, budget: str, level: str, period: str) -> bool:
        """Record that `level` ("warning", "exceeded", "hard_stop") of `budget` ("daily_tokens",
        ...) was reached in `period` ("2026-11-18", "2026-11"); True only the first time, so
        warnings and hard stops fire once per period, across gateway restarts too."""
        ...


class AuditSink(Protocol):
    def audit(self, event: str, **fields: Any) -> None:
        """Append one decision (budget warning, throttle, stop, key use) to the host audit log."""
        ...


@dataclass
class ControlPlaneHooks:
    """Callbacks the appliance wires in; the sandbox issue connects hard stops to the agent."""

    on_hard_stop: list[Any] = field(default_factory=list)  # callables (key: KeyRecord) -> None
