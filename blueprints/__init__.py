"""Versioned blueprint catalog and its loader (may import sandbox policy types)."""
