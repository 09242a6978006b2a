"""The embedded backend: a real transformers model on CPU (or GPU) behind vLLM's HTTP contract.

`python -m inference.embedded ...` or `serve(...)` loads the model and serves it; `create_app`
builds the FastAPI app over an `Engine`. torch and transformers are imported lazily (the
`embedded` extra), so importing this package costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.embedded.engine import Engine


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str = "model",
    model: str | None = None,
    cache_dir: str | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load the model and serve it (blocks). See `inference.embedded.server.serve`."""
    from inference.embedded.server import serve as _serve

    _serve(host, port, served_model_name, model=model, cache_dir=cache_dir, **engine_kwargs)


def load_engine(model: str | None = None, cache_dir: str | None = None, **kwargs: Any) -> Engine:
    """Load a model into a started Engine (see `Engine.load`)."""
    from inference.embedded.engine import Engine

    return Engine.load(model, cache_dir, **kwargs)


__all__ = ["load_engine", "serve"]
