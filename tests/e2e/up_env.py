"""The environment an e2e test runs `appliance up` in: its own state dir, free ports, no real
config layers, and the embedded model's converted weights shared with the other tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import cli_env, free_port


def environment(root: Path, config: pytest.Config | None, state: str = "state") -> dict[str, str]:
    """Everything under `root` (keep it short where unix sockets will live under it); `config`
    None (a benchmark script, no pytest): the weights are converted into `root`."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider
    if cache is not None:  # conversion costs ~20 s: share it with the embedded backend's tests
        (models / "cache").symlink_to(cache.mkdir("embedded-models"))
    return cli_env(
        root / state,
        root,
        APPLIANCE_MODELS_DIR=str(models),
        APPLIANCE_GATEWAY__PORT=str(free_port()),
        APPLIANCE_INFERENCE__BACKEND_LISTEN__PORT=str(free_port()),
        APPLIANCE_CONTROL__PORT=str(free_port()),  # the default is on: `up` checks who serves it
    )
