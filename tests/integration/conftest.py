"""Fixtures shared by integration modules: the embedded model's server (one per xdist worker)."""

from tests.embedded_fixtures import client, server, tokenizer, weights_cache

__all__ = ["client", "server", "tokenizer", "weights_cache"]
