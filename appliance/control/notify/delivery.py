"""Delivering notifications on background threads, so that no decision ever waits for a
receiver: `submit` only queues. Each webhook has its own bounded queue and worker thread, so a
receiver that hangs (up to its timeout_s, on every attempt) delays only its own deliveries. A
full queue drops a low-value delivery first (approval.pending, approval.expired, budget.warn,
test), else its oldest; an approval.pending whose approval has expired by the time its turn
comes is dropped unsent. Each drop is audited as notify.dropped with its reason.

A worker retries a failure that may pass (no connection, a timeout, 5xx, 429) with exponential
backoff and jitter, or the receiver's Retry-After (capped), up to `max_attempts`; another 4xx, a
redirect (never followed) or a missing secret is final. Retries wait in the queue by due time.
Each delivery's outcome is appended to the audit chain: notify.delivered or notify.failed
(hook, notification, event_id, attempts, status, error). The field is `notification`, not
`event`: the chain keeps `event` for the record's own name.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from appliance.config import WebhookConfig
from appliance.control.notify.events import NotifyEvent
from appliance.control.notify.formats import render
from appliance.control.notify.signing import sign
from appliance.notify_events import TEST_EVENT

log = logging.getLogger(__name__)

Audit = Callable[..., Any]
MAX_QUEUE = 256  # per webhook
# What a full queue drops first: a flood of these must never push out a kill or a tamper report.
LOW_VALUE = frozenset({"approval.pending", "approval.expired", "budget.warn", TEST_EVENT})
MAX_SECRET_BYTES = 4096


class SecretUnavailable(Exception):
    """The hook's secret cannot be read (its variable unset, its file unreadable or open to
    everyone): final, not retried."""


def read_secret(hook: WebhookConfig) -> bytes | None:
    """The hook's secret, read now (never kept): None when it has none."""
    if hook.secret_env is not None:
        value = os.environ.get(hook.secret_env, "")
        if not value:
            raise SecretUnavailable(f"the secret's variable {hook.secret_env} is not set")
        return value.encode()
    if hook.secret_file is not None:
        try:
            with hook.secret_file.open("rb") as f:
                if stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o004:
                    raise SecretUnavailable(
                        f"the secret file {hook.secret_file} is readable by every user "
                        "(chmod 600 it)"
                    )
                value = f.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise SecretUnavailable(f"the secret file {hook.secret_file}: {exc.strerror}") from None
        value = value.strip()
        if not value or len(value) > MAX_SECRET_BYTES:
            raise SecretUnavailable(f"the secret file {hook.secret_file} is empty or too long")
        return value
    return None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_s: float = 1.0
    cap_s: float = 30.0
    retry_after_cap_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based): doubling, jittered to 50-100%."""
        return min(self.cap_s, self.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def retry_after(self, header: str | None) -> float | None:
        """A Retry-After (seconds or an HTTP date) as seconds from now, capped; None if absent
        or unreadable."""
        if not header:
            return None
        header = header.strip()
        if header.isdigit():
            return min(float(header), self.retry_after_cap_s)
        try:
            when = parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return min(max(0.0, when - time.time()), self.retry_after_cap_s)


@dataclass
class Outcome:
    hook: str
    notification: str
    event_id: str
    ok: bool
    attempts: int
    status: int | None = None
    error: str | None = None
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(order=True)
class _Job:
    due: float  # monotonic
    seq: int  # submission order: ties, and which job is the oldest
    hook: WebhookConfig = field(compare=False)
    event: NotifyEvent = field(compare=False)
    link: str | None = field(compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass(frozen=True)
class _Try:
    """One attempt's result: done (outcome final) or retry in `retry_in` seconds."""

    status: int | None
    error: str | None
    retry_in: float | None = None


class _HookQueue:
    """One webhook's deliveries: its own bounded heap (by due time) and worker thread, so a
    receiver that hangs holds up only its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.heap: list[_Job] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.client: httpx.Client | None = None  # the worker's


class Deliverer:
    def __init__(
        self,
        audit: Audit,
        policy: RetryPolicy | None = None,
        max_queue: int = MAX_QUEUE,
        secret_reader: Callable[[WebhookConfig], bytes | None] = read_secret,
    ) -> None:
        self.audit = audit
        self.policy = policy or RetryPolicy()
        self.max_queue = max_queue  # per webhook
        self.read_secret = secret_reader
        self._queues: dict[str, _HookQueue] = {}
        self._lock = threading.Lock()  # the queues' map, the outcomes, starting and stopping
        self._seq = itertools.count()
        self._started = False
        self._stop = False
        self._last: dict[str, Outcome] = {}

    # -- the API the service uses -------------------------------------------------------------

    def start(self) -> None:
        """Start a worker for each webhook queued so far (later ones start at their first
        delivery)."""
        with self._lock:
            self._started = True
            for queue in self._queues.values():
                self._start_worker(queue)

    def submit(self, hook: WebhookConfig, event: NotifyEvent, link: str | None = None) -> None:
        """Queue a delivery; never blocks on the network. A full queue drops a low-value job
        (the oldest approval.pending, approval.expired, budget.warn, test) before any other,
        so a flood never pushes out a kill or a tamper report; failing that, its oldest."""
        job = _Job(time.monotonic(), next(self._seq), hook, event, link)
        queue = self._queue(hook.name)
        with queue.cond:
            dropped = None
            if len(queue.heap) >= self.max_queue:
                dropped = _victim(queue.heap)
                queue.heap.remove(dropped)
                heapq.heapify(queue.heap)
            heapq.heappush(queue.heap, job)
            queue.cond.notify()
        if dropped is not None:
            self._dropped(dropped, f"the delivery queue was full ({self.max_queue})")

    def deliver_now(
        self, hook: WebhookConfig, event: NotifyEvent, link: str | None = None
    ) -> Outcome:
        """One attempt, on the caller's thread (`notify test`: the operator sees the receiver's
        answer itself, not a retry's); audited like any delivery."""
        with httpx.Client(follow_redirects=False) as client:
            result = self._try(client, hook, event, link, attempt=1)
        return self._finish(hook, event, 1, result)

    def pending(self) -> int:
        with self._lock:
            queues = list(self._queues.values())
        return sum(len(q.heap) for q in queues)

    def last(self, hook: str) -> Outcome | None:
        with self._lock:
            return self._last.get(hook)

    def close(self, wait_s: float = 2.0) -> None:
        with self._lock:
            self._stop = True
            queues = list(self._queues.values())
        left = 0
        for queue in queues:
            with queue.cond:
                left += len(queue.heap)
                queue.heap.clear()
                queue.cond.notify_all()
        deadline = time.monotonic() + wait_s
        for queue in queues:
            if queue.thread is not None:
                queue.thread.join(max(0.0, deadline - time.monotonic()))
            if queue.client is not None:
                queue.client.close()
        if left:
            self._audit("notify.dropped", count=left, error="the control plane stopped first")

    # -- the workers --------------------------------------------------------------------------

    def _queue(self, name: str) -> _HookQueue:
        with self._lock:
            queue = self._queues.get(name)
            if queue is None:
                queue = self._queues[name] = _HookQueue(name)
                if self._started and not self._stop:
                    self._start_worker(queue)
            return queue

    def _start_worker(self, queue: _HookQueue) -> None:
        if queue.thread is not None:
            return
        queue.client = httpx.Client(follow_redirects=False)
        queue.thread = threading.Thread(
            target=self._run, args=(queue,), name=f"notify-{queue.name}", daemon=True
        )
        queue.thread.start()

    def _run(self, queue: _HookQueue) -> None:
        while True:
            with queue.cond:
                while not self._stop and (not queue.heap or queue.heap[0].due > time.monotonic()):
                    wait = queue.heap[0].due - time.monotonic() if queue.heap else None
                    queue.cond.wait(wait)
                if self._stop:
                    return
                job = heapq.heappop(queue.heap)
            try:
                if _expired(job.event):  # a tap could no longer approve it: not worth a push
                    self._dropped(job, "the approval expired before it could be sent")
                else:
                    self._attempt(queue, job)
            except Exception:  # the worker outlives any one delivery
                log.exception("delivering %s to %s failed", job.event.name, job.hook.name)

    def _attempt(self, queue: _HookQueue, job: _Job) -> None:
        job.attempts += 1
        assert queue.client is not None  # started
        result = self._try(queue.client, job.hook, job.event, job.link, job.attempts)
        if result.retry_in is not None and job.attempts < self.policy.max_attempts:
            job.due = time.monotonic() + result.retry_in
            with queue.cond:
                if not self._stop:
                    heapq.heappush(queue.heap, job)
                    queue.cond.notify()
                    return
        self._finish(job.hook, job.event, job.attempts, result)

    def _try(
        self,
        client: httpx.Client,
        hook: WebhookConfig,
        event: NotifyEvent,
        link: str | None,
        attempt: int,
    ) -> _Try:
        try:
            secret = self.read_secret(hook)
        except SecretUnavailable as exc:
            return _Try(None, str(exc))
        rendered = render(event, hook.format, link)
        headers = dict(rendered.headers)
        if secret is not None:
            headers.update(sign(secret, rendered.body))
        try:
            request = client.build_request(
                "POST", hook.url, content=rendered.body, headers=headers, timeout=hook.timeout_s
            )
            # Only the status and headers are wanted: a receiver's body is never read (a huge
            # one could not fill this process's memory).
            response = client.send(request, stream=True)
            response.close()
        except httpx.TransportError as exc:  # no connection, a timeout, a dropped answer
            return _Try(None, _error_text(exc, hook.url), self.policy.backoff(attempt))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # never a better retry
            return _Try(None, _error_text(exc, hook.url))
        code = response.status_code
        if response.is_success:
            return _Try(code, None)
        error = f"HTTP {code}"
        if response.is_redirect:
            return _Try(code, f"{error}: redirects are not followed (give the final URL)")
        if code == 429 or code >= 500:
            wait = self.policy.retry_after(response.headers.get("retry-after"))
            return _Try(code, error, self.policy.backoff(attempt) if wait is None else wait)
        return _Try(code, error)  # the receiver refused it: the same body would be refused again

    def _finish(
        self, hook: WebhookConfig, event: NotifyEvent, attempts: int, result: _Try
    ) -> Outcome:
        ok = result.error is None
        outcome = Outcome(
            hook.name, event.name, event.id, ok, attempts, result.status, result.error
        )
        with self._lock:
            self._last[hook.name] = outcome
        fields: dict[str, Any] = {
            "hook": hook.name,
            "notification": event.name,
            "event_id": event.id,
            "attempts": attempts,
            "status": result.status,
        }
        if not ok:
            fields["error"] = result.error
        self._audit("notify.delivered" if ok else "notify.failed", **fields)
        return outcome

    def _dropped(self, job: _Job, reason: str) -> None:
        self._audit(
            "notify.dropped",
            hook=job.hook.name,
            notification=job.event.name,
            event_id=job.event.id,
            attempts=job.attempts,
            error=reason,
        )

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit(event, **fields)
        except Exception:  # a full disk must not stop the deliveries themselves
            log.exception("auditing %s failed", event)


def _expired(event: NotifyEvent) -> bool:
    return (
        event.name == "approval.pending"
        and event.expires_at is not None
        and event.expires_at <= time.time()
    )


def _victim(heap: list[_Job]) -> _Job:
    """The job a full queue drops: the oldest low-value one, else the oldest."""
    low = [job for job in heap if job.event.name in LOW_VALUE]
    return min(low or heap, key=lambda job: job.seq)


def _error_text(exc: Exception, url: str) -> str:
    """What went wrong, without the URL (its path may be the receiver's secret)."""
    return f"{type(exc).__name__}: {exc or 'no detail'}".replace(url, "<url>")
