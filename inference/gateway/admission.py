"""Admission on the hot path: the key's budget verdict before forwarding, and the ledger and
metrics after the request (off the event loop: a queued writer thread)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

import anyio

from inference import budgets as budget_math
from inference.gateway.errors import GatewayError
from inference.gateway.metrics import GatewayMetrics
from inference.gateway.settings import GatewaySettings
from inference.metering import UsageWriter, cost_of
from inference.ports import (
    AuditSink,
    BudgetStore,
    ControlPlaneHooks,
    KeyRecord,
    Ledger,
    Spend,
    UsageRecord,
)

log = logging.getLogger(__name__)


class Admission:
    """Budgets, the ledger, the audit trail and the hard-stop hooks of one gateway."""

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
        self.writer = UsageWriter(ledger)
        self.prices = settings.price_table()
        self._marked: set[tuple[str, str, str, str]] = set()  # budget events already stored
        self._hook_tasks: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        if self._hook_tasks:
            await asyncio.wait(self._hook_tasks, timeout=10)
        await anyio.to_thread.run_sync(self.writer.close)

    def spend(self, key_id: str, now: float) -> Spend:
        stored = self.ledger.spend(key_id, now)
        tokens, cost = self.writer.pending(key_id)  # queued, not committed yet
        if not tokens and not cost:
            return stored
        return Spend(
            day_tokens=stored.day_tokens + tokens,
            month_tokens=stored.month_tokens + tokens,
            day_cost=stored.day_cost + cost,
            month_cost=stored.month_cost + cost,
        )

    def check_budget(self, key: KeyRecord) -> str | None:
        """Raise 429 when a limit is exhausted; return the warning header's value, if any."""
        budget = self.budgets.get_budget(key.id)
        if budget is None:
            return None
        now = time.time()
        verdict = budget_math.evaluate(
            budget, self.spend(key.id, now), now, self.settings.budget_warn_ratio
        )
        self.metrics.budget_state.labels(key.name).set(budget_math.STATE_VALUE[verdict.state])
        for use in verdict.warnings:
            if self._first(key, use, "warning"):
                self.metrics.budget_warnings.labels(key.name, use.name).inc()
                self.audit(
                    "budget.warning",
                    key,
                    budget=use.name,
                    used=use.used,
                    limit=use.limit,
                    percent=int(use.ratio * 100),
                    period=use.period(),
                )
        blocking = verdict.blocking
        if blocking is None:
            return verdict.warning_header()
        self.metrics.budget_refusals.labels(key.name, blocking.name).inc()
        level = "hard_stop" if blocking.monthly else "exceeded"
        if self._first(key, blocking, level):
            self.audit(
                f"budget.{level}",
                key,
                budget=blocking.name,
                used=blocking.used,
                limit=blocking.limit,
                period=blocking.period(),
                resets_at=budget_math.iso(blocking.resets_at),
            )
            if blocking.monthly:
                self._hard_stop(key)
        raise GatewayError(
            429,
            verdict.refusal_message(key.name),
            f"{blocking.name}_budget_exceeded",
            headers={
                "retry-after": str(verdict.retry_after_s(now)),
                "x-should-retry": "false",  # tells OpenAI SDKs not to spin on it
            },
        )

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

    # -- metering ------------------------------------------------------------------------

    def record(
        self,
        key: KeyRecord,
        route_path: str,
        model: str,
        status: int,
        started: float,
        stream: bool,
        prompt: int = 0,
        completion: int = 0,
    ) -> None:
        latency = time.perf_counter() - started
        cost = cost_of(self.prices, model, prompt, completion)
        self.writer.submit(
            UsageRecord(
                key_id=key.id,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_s=latency,
                status=status,
                stream=stream,
                cost=cost,
                ts=time.time(),
            )
        )
        m = self.metrics
        m.in_flight.dec()
        m.requests.labels(route_path, str(status), key.name, model).inc()
        m.latency.labels(route_path, model).observe(latency)
        if prompt or completion:
            m.prompt_tokens.labels(key.name, model).inc(prompt)
            m.completion_tokens.labels(key.name, model).inc(completion)
            if cost:
                m.cost.labels(key.name, model).inc(cost)
