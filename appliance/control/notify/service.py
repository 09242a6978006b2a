"""The plane's `notify` service: follows the audit log (follower.py), turns records into
notifications (events.py) for the webhooks that asked for them (config `notify.webhooks`) and
hands them to the delivery worker (delivery.py). Its thread (`run`) is one of the plane's.

A held request the sandbox repeats is one pending approval but a record per request: each
approval is notified once (its id remembered until it expires, MAX_REMEMBERED at most), so a
sandbox cannot flood the operator's phone or the delivery queues.

An approval.pending carries a link to that approval in the console; with `notify.one_tap: true`
a link with a signed, single-use token minted for that webhook (appliance/control/one_tap.py)
that approves once and expires with the approval.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from appliance.audit import audit_path
from appliance.config import WebhookConfig
from appliance.control.notify.delivery import Deliverer
from appliance.control.notify.events import NotifyEvent, event_for, event_for_test, tamper_event
from appliance.control.notify.follower import AuditFollower
from appliance.errors import NotFoundError

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane

log = logging.getLogger(__name__)

MAX_REMEMBERED = 4096  # approval ids notified and not yet expired


def public_url(url: str) -> str:
    """A webhook's URL as shown: scheme, host and port only, "/…" for whatever follows (a Slack
    or ntfy URL's path or query is its secret); never the userinfo."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    hidden = parts.path not in ("", "/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}" + ("/…" if hidden else "")


class SeenApprovals:
    """The approval ids already notified, each until its expiry; at most `limit` of them (when
    full, the expired go first, then the one expiring soonest)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.limit = limit
        self._until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def first_time(self, approval: str, until: float, now: float | None = None) -> bool:
        """True (and remembered) unless `approval` was notified and has not expired yet."""
        now = time.time() if now is None else now
        known = self._until.get(approval)
        if known is not None and known > now:
            return False
        self._until.pop(approval, None)
        if len(self._until) >= self.limit:
            self._until = {a: t for a, t in self._until.items() if t > now}
        while len(self._until) >= self.limit:
            del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[approval] = until
        return True


class NotifyService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.settings = plane.config.notify
        self.hooks: dict[str, WebhookConfig] = {h.name: h for h in self.settings.webhooks}
        self.deliverer = Deliverer(plane.audit_log.append)
        self.follower = AuditFollower(
            audit_path(plane.config.state_dir), self.on_record, self.on_tamper
        )
        self.notified = SeenApprovals()  # the follower thread's alone
        self._started = False

    # -- the thread ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Follow the audit log until `stop` (plane.start_threads). With no webhook there is
        nothing to follow for."""
        if not self.hooks:
            return
        self.deliverer.start()
        self._started = True
        self.follower.run(stop)

    def on_record(self, record: dict[str, Any]) -> None:
        event = event_for(record)
        if event is None:
            return
        approval = event.fields.get("approval")
        if event.name == "approval.pending" and isinstance(approval, str):
            until = event.expires_at if event.expires_at is not None else time.time()
            if not self.notified.first_time(approval, until):
                return  # another request held under the same approval: notified already
        self.dispatch(event)

    def on_tamper(self, kind: str, detail: str) -> None:
        self.dispatch(tamper_event(kind, detail))

    def dispatch(self, event: NotifyEvent) -> None:
        """Queue `event` for every webhook that wants it (never waits on the network)."""
        for hook in self.hooks.values():
            if event.name in hook.events:
                self.deliverer.submit(hook, event, self.link(hook, event))

    def link(self, hook: WebhookConfig, event: NotifyEvent) -> str | None:
        approval = event.fields.get("approval")
        if event.name != "approval.pending" or not isinstance(approval, str):
            return None
        from appliance.control.one_tap import approval_link

        token = None
        if self.settings.one_tap and event.expires_at is not None:
            if event.expires_at <= time.time():
                return approval_link(self.plane.config, approval)  # too late to tap
            try:
                sandbox = event.fields.get("sandbox")
                token = self.plane.one_tap.mint(
                    approval, event.expires_at, hook.name, sandbox=sandbox
                )
            except Exception:  # the plain link still reaches the console
                log.exception("minting a one-tap link for approval %s failed", approval)
        return approval_link(self.plane.config, approval, token)

    # -- the API's calls ----------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Each webhook as configured, without its secret, and its last delivery's outcome."""
        out = []
        for hook in self.hooks.values():
            last = self.deliverer.last(hook.name)
            out.append(
                {
                    "name": hook.name,
                    "url": public_url(hook.url),
                    "format": hook.format,
                    "events": list(hook.events),
                    "signed": hook.secret_env is not None or hook.secret_file is not None,
                    "secret_from": _secret_source(hook),
                    "timeout_s": hook.timeout_s,
                    "one_tap": self.settings.one_tap,
                    "last": last.as_dict() if last is not None else None,
                }
            )
        return out

    def test(self, who: Principal, name: str) -> dict[str, Any]:
        """Send a `test` event to webhook `name` now, once; its outcome (also audited)."""
        hook = self.hooks.get(name)
        if hook is None:
            names = ", ".join(self.hooks) or "none (add notify.webhooks to the config)"
            raise NotFoundError(
                f"no webhook named {name!r}; configured: {names}", hint="`appliance notify list`"
            )
        return self.deliverer.deliver_now(hook, event_for_test(who.name)).as_dict()

    def close(self) -> None:
        if self._started:
            self.deliverer.close()


def _secret_source(hook: WebhookConfig) -> str | None:
    """Where the secret is read from (a name, never the value)."""
    if hook.secret_env is not None:
        return f"env {hook.secret_env}"
    if hook.secret_file is not None:
        return f"file {hook.secret_file}"
    return None
