"""Sandbox policy, compilers, supervisor, egress proxy and lifecycle (imports nothing of ours)."""
