"""Admission on the hot path: every request that passes auth and validation is admitted with a
reservation before it is forwarded, and settled when it ends.

- Reserve: the prompt's upper bound (prompt_bound.py) + max_tokens per choice x choices (the
  larger of max_tokens and max_completion_tokens; without either, the larger context of the
  routed model and its fallback); a budget that cannot hold that caps max_tokens, and refuses
  (429) when not one completion token fits. Under a budget the backend is always sent a
  max_tokens within the reservation (backend_max_tokens), that also fits the routed model's
  context.
- The reservation is the request's ledger row, written `open` in one store transaction with the
  decision (Ledger.reserve: atomic across coroutines, threads and gateway processes), so
  warnings and throttles count settled spend + every open reservation.
- Settle: the real usage replaces the reservation (`ok`, `error`, `cancelled`), through the
  writer thread; a refusal before admission is a `refused` row.
- A gateway that dies leaves `open` rows; the next start settles those whose owner process is
  gone as `interrupted`, charged their reservation (an upper bound: the backend stops generating
  when the gateway's connection drops). Owners are named by boot, pid namespace, pid and start
  time, so gateways in other containers on the same store never settle each other's rows
  (owner_alive).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import anyio

from inference import budgets as budget_math
from inference.gateway import prompt_bound
from inference.gateway.errors import GatewayError
from inference.gateway.metrics import GatewayMetrics
from inference.gateway.owners import owner_alive, process_token
from inference.gateway.settings import GatewaySettings
from inference.metering import UsageWriter, cost_of
from inference.ports import (
    AuditSink,
    BudgetStore,
    ControlPlaneHooks,
    KeyRecord,
    Ledger,
    LedgerState,
    Reservation,
    Settlement,
    Spend,
    UsageRecord,
)

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One admitted request, from its reservation to its settlement."""

    request_id: str
    key: KeyRecord
    path: str
    model: str
    stream: bool
    started: float  # perf_counter
    reservation: Reservation
    warning: str | None
    settled: bool = False


def check_context(body: dict[str, Any], context: int | None) -> None:
    """400 `context_length_exceeded` for a prompt that provably cannot fit: a lower bound of
    its tokens (prompt_bound.lower_bound) plus max_tokens (or one token) over the context. What
    the cheap bound cannot prove, the backend checks exactly."""
    if context is None:
        return
    prompt = prompt_bound.lower_bound(body)
    completion = prompt_bound.completion_bound(body) or 1
    if prompt + completion <= context:
        return
    field = "messages" if "messages" in body else "prompt"
    raise GatewayError(
        400,
        f"This model's maximum context length is {context} tokens. However, your {field} "
        f"have at least {prompt} tokens (a lower bound from their length) and {completion} "
        f"{'are' if completion > 1 else 'is'} asked for the completion. Please reduce the "
        f"length of the {field} or completion.",
        "context_length_exceeded",
        field,
    )


class Admission:
    """Budgets, reservations, the ledger, the audit trail and the hard-stop hooks of a gateway."""

    def __init__(
        self,
        settings: GatewaySettings,
        ledger: Ledger,
        budgets: BudgetStore,
        audit: AuditSink,
        hooks: ControlPlaneHooks | None,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.budgets = budgets
        self.audit_sink = audit
        self.hooks = hooks or ControlPlaneHooks()
        self.metrics = metrics
        self.prices = settings.price_table()
        self.owner = process_token()
        # Rows a dead gateway left open; the writer starts after, so none of ours is touched.
        interrupted = ledger.interrupt_open(owner_alive)
        if interrupted:
            log.warning("settled %d ledger rows left open by a stopped gateway", interrupted)
        self.writer = UsageWriter(ledger)
        # One admission transaction at a time from this process (others wait on SQLite's lock).
        self._limiter = anyio.CapacityLimiter(1)
        self._marked: set[tuple[str, str, str, str]] = set()  # budget events already stored
        self._hook_tasks: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        if self._hook_tasks:
            await asyncio.wait(self._hook_tasks, timeout=10)
        await anyio.to_thread.run_sync(self.writer.close)

    # -- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        key: KeyRecord,
        path: str,
        models: list[str],
        body: dict[str, Any],
        context: int | None,
        reserve_context: int | None,
        only_local: bool,
        started: float,
    ) -> Ticket:
        """Reserve for the request or raise 429; may set the body's max_tokens (the cap).
        `models`: the routed model, then any fallback (priced at the dearer of them);
        `context`: the routed model's; `reserve_context`: the larger of it and the fallback's,
        what a request without max_tokens reserves (None: unknown); `only_local`: the local
        backend serves it, no fallback (its own default max_tokens fits its context)."""
        now = time.time()
        model = models[0]
        overhead = self.settings.prompt_overhead_tokens
        prompt = prompt_bound.upper_bound(body, overhead)
        asked = prompt_bound.completion_bound(body)
        unbounded = reserve_context or self.settings.upstream_max_model_len
        per_choice = asked if asked is not None else unbounded
        priced = [self.prices.get(m, (0.0, 0.0)) for m in models]
        price = (max(p[0] for p in priced), max(p[1] for p in priced))
        ask = budget_math.Ask(
            prompt_tokens=prompt,
            completion_tokens=per_choice,
            choices=prompt_bound.choices(body),
            prompt_price=price[0] / 1_000_000,
            completion_price=price[1] / 1_000_000,
        )
        budget = self.budgets.get_budget(key.id)
        request_id = "req_" + secrets.token_hex(12)
        stream = body.get("stream") is True
        verdict: list[budget_math.Grant] = []

        def decide(settled: Spend, reserved: Spend) -> Reservation | None:
            grant = budget_math.grant(
                budget, settled, reserved, ask, now, self.settings.budget_warn_ratio
            )
            verdict.append(grant)
            if not grant.admitted:
                return None
            cap = grant.completion_tokens
            return Reservation(
                request_id=request_id,
                key_id=key.id,
                model=model,
                stream=stream,
                prompt_tokens=prompt,
                completion_tokens=ask.choices * cap,
                cost=ask.cost(cap),
                ts=now,
                owner=self.owner,
            )

        try:
            reservation = await anyio.to_thread.run_sync(
                self.ledger.reserve, key.id, now, decide, budget is not None, limiter=self._limiter
            )
        except Exception:  # the store is locked past its timeout, or broken: fail closed
            log.exception("admission of %s failed", request_id)
            raise GatewayError(
                503, "the usage ledger is unavailable; try again shortly", "ledger_unavailable"
            ) from None
        grant = verdict[-1]
        if budget is not None:
            self._budget_events(key, grant, reservation is None)
        if reservation is None:
            raise self._refusal(key, grant, ask, now)
        if budget is not None:  # the backend must not generate past what was reserved
            sent = backend_max_tokens(grant.completion_tokens, asked, prompt, context, only_local)
            if sent is not None:
                _set_max_tokens(body, sent)
        return Ticket(
            request_id, key, path, model, stream, started, reservation, grant.warning_header()
        )

    def _refusal(
        self, key: KeyRecord, grant: budget_math.Grant, ask: budget_math.Ask, now: float
    ) -> GatewayError:
        b = grant.blocking
        assert b is not None
        if grant.exhausted:
            what = "monthly cap reached, key stopped" if b.monthly else "daily budget exhausted"
            message = (
                f"budget exceeded for key '{key.name}': {b.label} {b.amount(b.used)} of "
                f"{b.amount(b.limit)} used or held by requests in flight ({what}); "
                f"resets at {budget_math.iso(b.resets_at)}"
            )
        else:
            message = (
                f"request too large for the budget of key '{key.name}': {b.label} "
                f"{b.amount(max(0.0, b.limit - b.used))} of {b.amount(b.limit)} left "
                f"(counting requests in flight), and this request needs up to "
                f"{b.amount(ask.smallest(b))} (a bound on its prompt plus one completion "
                "token); send a shorter prompt"
            )
        retry = b.resets_at.timestamp() - now if grant.spent_out else 1
        return GatewayError(
            429,
            message,
            f"{b.name}_budget_exceeded",
            headers={
                "retry-after": str(max(1, int(retry + 0.999))),
                "x-should-retry": "false",  # tells OpenAI SDKs not to spin on it
            },
        )

    def _budget_events(self, key: KeyRecord, grant: budget_math.Grant, refused: bool) -> None:
        """The state gauge, warnings (audited once a period) and, for a request refused by a
        limit its settled spend has used up (not one merely held by reservations, nor a
        request too large for it), `budget.exceeded`, or for a monthly one `budget.hard_stop`
        and the control plane's hook."""
        m = self.metrics
        m.budget_state.labels(key.id).set(budget_math.STATE_VALUE[grant.state])
        for use in grant.warnings:
            if self._first(key, use, "warning"):
                m.budget_warnings.labels(key.id, use.name).inc()
                self.audit(
                    "budget.warning",
                    key,
                    budget=use.name,
                    used=use.used,
                    limit=use.limit,
                    percent=int(use.ratio * 100),
                    period=use.period(),
                )
        if not refused:
            return
        use = grant.blocking
        assert use is not None
        m.budget_refusals.labels(key.id, use.name).inc()
        if grant.spent_out:
            level = "hard_stop" if use.monthly else "exceeded"
            if self._first(key, use, level):
                self.audit(
                    f"budget.{level}",
                    key,
                    budget=use.name,
                    used=use.used,
                    limit=use.limit,
                    period=use.period(),
                    resets_at=budget_math.iso(use.resets_at),
                )
                if use.monthly:
                    self._hard_stop(key)

    def _first(self, key: KeyRecord, use: budget_math.BudgetUse, level: str) -> bool:
        mark = (key.id, use.name, level, use.period())
        if mark in self._marked:
            return False
        self._marked.add(mark)
        return self.budgets.mark_budget_event(*mark)

    def audit(self, event: str, key: KeyRecord, **fields: Any) -> None:
        try:
            self.audit_sink.audit(event, key_id=key.id, key_name=key.name, **fields)
        except Exception:  # an audit failure must not take the request path down
            log.exception("audit %s failed", event)

    def _hard_stop(self, key: KeyRecord) -> None:
        """Tell the control plane, off the request path: a hook may stop a whole sandbox."""
        loop = asyncio.get_running_loop()
        for callback in self.hooks.on_hard_stop:
            if inspect.iscoroutinefunction(callback):
                fut: asyncio.Future[Any] = asyncio.ensure_future(callback(key))
            else:
                fut = loop.run_in_executor(None, callback, key)
            self._hook_tasks.add(fut)
            fut.add_done_callback(self._hook_done)

    def _hook_done(self, fut: asyncio.Future[Any]) -> None:
        self._hook_tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("hard-stop hook failed: %r", fut.exception())

    # -- the ledger and metrics after the request ---------------------------------------------

    def refuse(self, key: KeyRecord, path: str, model: str, status: int, started: float) -> None:
        """A request turned away before admission: a `refused` row, nothing reserved."""
        latency = time.perf_counter() - started
        self.writer.submit(
            UsageRecord(
                key_id=key.id,
                model=model,
                prompt_tokens=0,
                completion_tokens=0,
                latency_s=latency,
                status=status,
                stream=False,
                ts=time.time(),
                state="refused",
            )
        )
        self._observe(key, path, model, status, latency, 0, 0, 0.0)

    def settle(
        self,
        ticket: Ticket,
        status: int,
        state: LedgerState,
        prompt: int = 0,
        completion: int = 0,
    ) -> None:
        """Replace the ticket's reservation with what it used (once, however it ended)."""
        if ticket.settled:
            return
        ticket.settled = True
        r = ticket.reservation
        if prompt > r.prompt_tokens or completion > r.completion_tokens:
            # The bound is wrong for this model (prompt_overhead_tokens too small?): the ledger
            # keeps the truth, and the log says why the budget may be passed.
            log.error(
                "request %s used %d+%d tokens, more than its reservation %d+%d",
                ticket.request_id,
                prompt,
                completion,
                r.prompt_tokens,
                r.completion_tokens,
            )
        latency = time.perf_counter() - ticket.started
        cost = cost_of(self.prices, ticket.model, prompt, completion)
        self.writer.submit(
            Settlement(
                request_id=ticket.request_id,
                key_id=ticket.key.id,
                model=ticket.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost=cost,
                latency_s=latency,
                status=status,
                state=state,
                ts=r.ts,
            )
        )
        self._observe(
            ticket.key, ticket.path, ticket.model, status, latency, prompt, completion, cost
        )

    def _observe(
        self,
        key: KeyRecord,
        path: str,
        model: str,
        status: int,
        latency: float,
        prompt: int,
        completion: int,
        cost: float,
    ) -> None:
        m = self.metrics  # keys by id: a scrape never shows the keys' human names
        m.in_flight.dec()
        m.requests.labels(path, str(status), key.id, model).inc()
        m.latency.labels(path, model).observe(latency)
        if prompt or completion:
            m.prompt_tokens.labels(key.id, model).inc(prompt)
            m.completion_tokens.labels(key.id, model).inc(completion)
            if cost:
                m.cost.labels(key.id, model).inc(cost)


def backend_max_tokens(
    cap: int, asked: int | None, prompt: int, context: int | None, only_local: bool
) -> int | None:
    """The max_tokens to send so that the backend generates at most `cap` per choice (what was
    reserved); None: the body may go as it is."""
    if asked is not None:
        return cap if cap < asked else None  # whichever field the backend reads is <= asked
    if context is not None:
        if only_local and cap >= context:
            return None  # the local backend's default (its context - the prompt) is under cap
        if context - prompt >= 1:
            return min(cap, context - prompt)  # fits the routed model whatever the real prompt
    return cap  # an upstream's context is only assumed: send the bound itself


def _set_max_tokens(body: dict[str, Any], cap: int) -> None:
    body["max_tokens"] = cap
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = cap
