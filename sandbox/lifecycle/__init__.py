"""Sandbox lifecycle over podman-py: create, start, stop, rm, exec, kill and reconcile.

It imports nothing of `appliance`: what it needs from the host (the sandbox records, the keys,
the audit log, a few settings) it declares as ports (ports.py), which the control plane
implements and hands in (appliance/control/wiring.py builds the manager).
"""
