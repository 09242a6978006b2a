"""The control plane: one long-running process (`appliance serve control`) that owns the store,
the audit log, keys, budgets, sandboxes, agents, approvals and the kill switch, and serves them as
a versioned HTTP API (`api/`) on <state_dir>/run/control.sock and a loopback port. The CLI
(`client.py`), the console and Ansible are its clients; the agents can reach none of it."""
