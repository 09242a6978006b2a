"""The embedded backend: a real transformers model on CPU (or GPU) behind vLLM's HTTP contract.

`python -m inference.embedded ...` or `serve(...)` loads the model and serves it; `create_app`
builds the FastAPI app over an `Engine`. torch and transformers are imported lazily (the
`embedded` extra), so importing this package costs nothing: `serve` and `load_engine` are looked
up on first use (`load_engine` is `Engine.load`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_engine", "serve"]


def __getattr__(name: str) -> Any:
    if name == "serve":
        from inference.embedded.server import serve

        return serve
    if name == "load_engine":
        from inference.embedded.engine import Engine

        return Engine.load
    raise AttributeError(name)
