"""The notification events a webhook may ask for (config: notify.webhooks[].events).

The config validates names against this list and the control plane's notify package
(appliance/control/notify/events.py) maps audit records onto them: both read it from here, so the
config never depends on the control plane.
"""

from __future__ import annotations

EVENTS = (
    "approval.pending",
    "approval.expired",
    "budget.warn",
    "budget.throttle",
    "budget.stop",
    "agent.killed",
    "agent.crashed",
    "agent.fail_closed",
    "audit.tamper",
)
TEST_EVENT = "test"  # `appliance notify test NAME`: sent to that hook whatever its events
