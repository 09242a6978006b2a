"""Delivering notifications on a background thread, so that no decision ever waits for a
receiver: `submit` only queues (a bounded queue: when full the oldest delivery is dropped, and
that is audited), one worker sends, retrying a failure that may pass (no connection, a timeout,
5xx, 429) with exponential backoff and jitter, or the receiver's Retry-After (capped), up to
`max_attempts`; another 4xx, a redirect (never followed) or a missing secret is final.

Retries wait in a heap by due time, so a receiver that is down delays only its own deliveries.
Each delivery's outcome is appended to the audit chain: notify.delivered or notify.failed
(hook, notification, event_id, attempts, status, error); a dropped one as notify.dropped. The
field is `notification`, not `event`: the chain keeps `event` for the record's own name.
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

log = logging.getLogger(__name__)

Audit = Callable[..., Any]
MAX_QUEUE = 256
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
        self.max_queue = max_queue
        self.read_secret = secret_reader
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stop = False
        self._last: dict[str, Outcome] = {}
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None  # the worker's (start)

    # -- the API the service uses -------------------------------------------------------------

    def start(self) -> None:
        self._client = httpx.Client(follow_redirects=False)
        self._thread = threading.Thread(target=self._run, name="notify-delivery", daemon=True)
        self._thread.start()

    def submit(self, hook: WebhookConfig, event: NotifyEvent, link: str | None = None) -> None:
        """Queue a delivery; never blocks on the network (a full queue drops its oldest)."""
        job = _Job(time.monotonic(), next(self._seq), hook, event, link)
        with self._cond:
            dropped = None
            if len(self._heap) >= self.max_queue:
                dropped = min(self._heap, key=lambda j: j.seq)
                self._heap.remove(dropped)
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, job)
            self._cond.notify()
        if dropped is not None:
            self._audit(
                "notify.dropped",
                hook=dropped.hook.name,
                notification=dropped.event.name,
                event_id=dropped.event.id,
                attempts=dropped.attempts,
                error=f"the delivery queue was full ({self.max_queue})",
            )

    def deliver_now(
        self, hook: WebhookConfig, event: NotifyEvent, link: str | None = None
    ) -> Outcome:
        """One attempt, on the caller's thread (`notify test`: the operator sees the receiver's
        answer itself, not a retry's); audited like any delivery."""
        with httpx.Client(follow_redirects=False) as client:
            result = self._try(client, hook, event, link, attempt=1)
        return self._finish(hook, event, 1, result)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def last(self, hook: str) -> Outcome | None:
        with self._cond:
            return self._last.get(hook)

    def close(self, wait_s: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            left = len(self._heap)
            self._heap.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait_s)
        if self._client is not None:
            self._client.close()
        if left:
            self._audit("notify.dropped", count=left, error="the control plane stopped first")

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0].due > time.monotonic()):
                    wait = self._heap[0].due - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._stop:
                    return
                job = heapq.heappop(self._heap)
            try:
                self._attempt(job)
            except Exception:  # the worker outlives any one delivery
                log.exception("delivering %s to %s failed", job.event.name, job.hook.name)

    def _attempt(self, job: _Job) -> None:
        job.attempts += 1
        assert self._client is not None  # started
        result = self._try(self._client, job.hook, job.event, job.link, job.attempts)
        if result.retry_in is not None and job.attempts < self.policy.max_attempts:
            job.due = time.monotonic() + result.retry_in
            with self._cond:
                if not self._stop:
                    heapq.heappush(self._heap, job)
                    self._cond.notify()
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
        with self._cond:
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

    def _audit(self, event: str, **fields: Any) -> None:
        try:
            self.audit(event, **fields)
        except Exception:  # a full disk must not stop the deliveries themselves
            log.exception("auditing %s failed", event)


def _error_text(exc: Exception, url: str) -> str:
    """What went wrong, without the URL (its path may be the receiver's secret)."""
    return f"{type(exc).__name__}: {exc or 'no detail'}".replace(url, "<url>")
