"""Fixtures shared by integration modules: the embedded model's server (one per xdist worker),
and a supervisor's scratch box (tests/integration/supervisor_box.py)."""

from collections.abc import Iterator

import pytest

from tests.embedded_fixtures import client, server, tokenizer, weights_cache
from tests.integration.supervisor_box import Box, made_box

__all__ = ["box", "client", "server", "tokenizer", "weights_cache"]


@pytest.fixture
def box() -> Iterator[Box]:
    """A scratch directory for one supervisor run as a plain process (the modules using it skip
    where supervisor_box.UNUSABLE says the host cannot run one)."""
    with made_box() as made:
        yield made
