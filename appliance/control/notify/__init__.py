"""Notifications: decisions already in the audit chain, pushed to operators' webhooks.

One mechanism for every process: the control plane follows <state_dir>/audit/audit.jsonl
(follower.py), maps records to notification events (events.py), renders each for its receiver
(formats.py, signed by signing.py) and delivers them on a background thread with bounded retries
(delivery.py); the plane's `notify` service (service.py) ties them together. Each delivery's
outcome goes back into the chain as notify.delivered / notify.failed, which the follower skips.

The event names are appliance/notify_events.py's, which the config validates against: the config
never imports this package.
"""
