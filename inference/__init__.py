"""Inference backends and the inference.local gateway (may import hardware only)."""
