"""`vllm serve` as a supervised child process, launched from the planner's ServingPlan.

On an out-of-memory failure at start the plan is stepped down and vLLM started again, as the
DGX Spark playbooks advise (REFERENCE §2): first `--gpu-memory-utilization` in steps of 0.05 down to
0.70, then `--max-model-len` halved down to 32768. Each step is recorded as a Reason on the plan.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hardware.plan_types import Reason, ServingPlan
from inference.backends.base import (
    BackendStartError,
    BackendTimeout,
    ProgressCallback,
)
from inference.backends.container import ContainerSpec
from inference.backends.process import ProcessBackend

log = logging.getLogger(__name__)

VLLM_DEFAULT_UTILIZATION = 0.92  # vLLM's own default when the flag is absent
VLLM_DEFAULT_PORT = 8000


# --------------------------------------------------------------------------------------------
# Recognising an out-of-memory start (pure functions)
# --------------------------------------------------------------------------------------------

OomKind = Literal["memory", "context"]

# "memory": the weights / profiling / free-memory check failed -> lower utilisation first.
_MEMORY = re.compile(
    r"CUDA out of memory|OutOfMemoryError|No available memory for the cache blocks"
    r"|Free memory on device.*less than desired GPU memory utilization",
    re.IGNORECASE,
)
# "context": one max-length sequence does not fit the KV cache -> lowering utilisation cannot help.
_CONTEXT = re.compile(r"max seq len.*larger than the available KV cache memory", re.IGNORECASE)
_ESTIMATE = re.compile(r"estimated maximum model length is (\d+)")


@dataclass(frozen=True)
class Oom:
    kind: OomKind
    message: str  # the log line that says so
    estimate: int | None = None  # vLLM's estimate of the max model length that would fit


def diagnose_oom(log_text: str) -> Oom | None:
    """The out-of-memory cause in a failed start's log, if that is why it failed."""
    for line in reversed(log_text.replace("\r", "\n").splitlines()):
        if _CONTEXT.search(line):
            found = _ESTIMATE.search(line)
            return Oom("context", line.strip(), int(found.group(1)) if found else None)
        if _MEMORY.search(line):
            return Oom("memory", line.strip())
    return None


@dataclass(frozen=True)
class StepLimits:
    min_utilization: float = 0.70
    utilization_step: float = 0.05
    min_max_model_len: int = 32768


@dataclass(frozen=True)
class StepDown:
    utilization: float
    max_model_len: int
    setting: str  # the flag that changed
    old: str
    new: str


def next_step_down(
    utilization: float,
    max_model_len: int,
    kind: OomKind = "memory",
    estimate: int | None = None,
    limits: StepLimits = StepLimits(),
) -> StepDown | None:
    """The next (utilisation, max-model-len) to try after an OOM at start; None: nothing left."""
    # Integer hundredths: 0.92 - 0.05 must be 0.87, not 0.8699999.
    util, floor = round(utilization * 100), round(limits.min_utilization * 100)
    if kind == "memory" and util > floor:
        new = max(floor, util - round(limits.utilization_step * 100))
        old_text, new_text = f"{util / 100:.2f}", f"{new / 100:.2f}"
        return StepDown(new / 100, max_model_len, "--gpu-memory-utilization", old_text, new_text)
    shortest = limits.min_max_model_len
    if max_model_len <= shortest or (estimate is not None and estimate < shortest):
        return None
    length = max(shortest, max_model_len // 2)
    while estimate is not None and length > estimate and length > shortest:
        length = max(shortest, length // 2)  # straight to what vLLM says would fit
    return StepDown(utilization, length, "--max-model-len", str(max_model_len), str(length))


def step_down_sequence(
    utilization: float,
    max_model_len: int,
    limits: StepLimits = StepLimits(),
) -> list[StepDown]:
    """Every step an OOM that never clears walks through, in order."""
    steps: list[StepDown] = []
    while (step := next_step_down(utilization, max_model_len, limits=limits)) is not None:
        steps.append(step)
        utilization, max_model_len = step.utilization, step.max_model_len
    return steps


# --------------------------------------------------------------------------------------------
# argv editing
# --------------------------------------------------------------------------------------------


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last occurrence of `flag` (argparse semantics), `--f v` or `--f=v`."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def set_flag(argv: Sequence[str], flag: str, value: str) -> list[str]:
    """argv with every occurrence of `flag` set to `value` (appended if absent)."""
    out, found, i = [], False, 0
    args = list(argv)
    while i < len(args):
        if args[i] == flag and i + 1 < len(args):
            out += [flag, value]
            found, i = True, i + 2
            continue
        if args[i].startswith(flag + "="):
            out.append(f"{flag}={value}")
            found = True
        else:
            out.append(args[i])
        i += 1
    return out if found else [*out, flag, value]


# --------------------------------------------------------------------------------------------
# Load progress from the log (pure)
# --------------------------------------------------------------------------------------------

# vLLM's multiprocess output is prefixed by the process it came from; tqdm redraws with \r.
_PROCESS_PREFIX = re.compile(r"^\((?:EngineCore|Worker|APIServer)[^)]*pid=\d+\)\s*")
_SHARDS = re.compile(r"Loading safetensors checkpoint shards:\s*(\d+)% Completed \| (\d+)/(\d+)")


def load_progress(log_tail: str) -> str:
    """The progress line for a loading vLLM: the latest non-empty `\r`/newline segment of its
    log (without the process prefix), with the weight-loading bar shown as
    `loading weights 45% (9/20 shards)`."""
    for segment in reversed(re.split(r"[\r\n]", log_tail)):
        text = _PROCESS_PREFIX.sub("", segment.strip()).strip()
        if text:
            break
    else:
        return ""
    if found := _SHARDS.search(text):
        pct, done, total = found.groups()
        return f"loading weights {int(pct)}% ({done}/{total} shards)"
    return text[:200]


def _connect_host(host: str | None) -> str:
    if host in (None, "", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def hf_hub_cache(env: Mapping[str, str]) -> Path:
    """Where huggingface_hub keeps models, by its own rules."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class VllmBackend(ProcessBackend):
    """vLLM from a ServingPlan; `executable` replaces the leading `vllm` (tests: a stand-in)."""

    def __init__(
        self,
        plan: ServingPlan,
        *,
        log_path: str | Path,
        executable: Sequence[str] = ("vllm",),
        offline: bool = False,
        model_path: str | Path | None = None,
        hf_home: str | Path | None = None,
        api_key: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        limits: StepLimits | None = None,
        on_step_down: Callable[[Reason], None] | None = None,
        container: ContainerSpec | None = None,
        warm_up: bool = True,
    ) -> None:
        """`hf_home`: the host's Hugging Face home (in a `container`, the same directory is
        mounted there as container.hf_home, which vLLM is given)."""
        if plan.backend != "vllm" or plan.argv[:2] != ["vllm", "serve"]:
            raise ValueError(f"not a vLLM plan (backend {plan.backend!r})")
        if container is not None and model_path is not None:
            raise ValueError("a local model directory is not mounted into the container")
        self._plan = plan
        self._offline = offline
        self._model_path = Path(model_path) if model_path is not None else None
        self._limits = limits or StepLimits()
        self._on_step_down = on_step_down
        self.step_downs: list[Reason] = []
        argv = [*executable, *plan.argv[1:]]
        self._model_index = len(executable) + 1  # `serve MODEL`
        if self._model_path is not None:
            argv[self._model_index] = str(self._model_path)
        env = {**plan.env, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # never phone home
        if offline:
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._host_hf_home = Path(hf_home) if hf_home is not None else None
        if container is not None:
            env["HF_HOME"] = container.hf_home
        elif hf_home is not None:
            env["HF_HOME"] = str(hf_home)
        if api_key:
            env["VLLM_API_KEY"] = api_key  # vLLM reads it when --api-key is absent: not in argv
        env.update(extra_env or {})
        host = _connect_host(flag_value(argv, "--host"))
        port = flag_value(argv, "--port") or str(VLLM_DEFAULT_PORT)
        super().__init__(
            argv,
            base_url=f"http://{host}:{port}",
            log_path=log_path,
            env=env,
            name="vllm",
            api_key=api_key,
            container=container,
            warmup_model=plan.served_model_name if warm_up else None,
        )

    @property
    def plan(self) -> ServingPlan:
        """The plan as it runs now: after any OOM step-downs."""
        return self._plan

    @property
    def model(self) -> str:
        return self.argv[self._model_index]

    @property
    def served_model_name(self) -> str:
        return self._plan.served_model_name

    # ---- start ----------------------------------------------------------------------------

    def start(self) -> None:
        self._check_model()
        super().start()

    def _check_model(self) -> None:
        """Fail early and clearly when the weights cannot be there (offline: nothing fetched)."""
        if self._model_path is not None:
            if not self._model_path.is_dir():
                raise BackendStartError(
                    f"model directory {self._model_path} does not exist", retryable=False
                )
            return
        if self.container is not None:
            # The container reads the host's <models_dir>/hf read-only (and the image is
            # offline): the weights must be there before it starts.
            cache = hf_hub_cache({"HF_HOME": str(self._host_hf_home or "")})
            why = f"the container reads its weights read-only from {cache}"
        elif self._offline and not Path(self.model).is_dir():
            cache = hf_hub_cache({**os.environ, **self.env})
            why = "the appliance is offline (HF_HUB_OFFLINE=1)"
        else:
            return
        snapshots = cache / f"models--{self.model.replace('/', '--')}" / "snapshots"
        if not (snapshots.is_dir() and any(snapshots.iterdir())):
            raise BackendStartError(
                f"model {self.model} is not in the Hugging Face cache ({cache}) and {why}: "
                "download it (`appliance up` does), install it from an offline bundle or give a "
                "local model directory",
                retryable=False,
            )

    def progress_line(self) -> str:
        return load_progress(self.log_tail(5))

    def _current(self) -> tuple[float, int]:
        util = flag_value(self.argv, "--gpu-memory-utilization")
        length = flag_value(self.argv, "--max-model-len")
        return (
            float(util) if util else self._plan.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION,
            int(length) if length else self._plan.max_model_len,
        )

    def launch(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Start and wait for /health; on OOM at start step the plan down and try again."""
        while True:
            try:
                super().launch(timeout, progress, cancel)  # stops the process on any failure
                return
            except BackendStartError as exc:
                if isinstance(exc, BackendTimeout):
                    raise
                oom = diagnose_oom(self.log_since_start())  # the log outlives the process
                if oom is None:
                    raise
                self._step_down(oom, exc)

    def _step_down(self, oom: Oom, exc: BackendStartError) -> None:
        util, length = self._current()
        step = next_step_down(util, length, oom.kind, oom.estimate, self._limits)
        if step is None:
            lim = self._limits
            raise BackendStartError(
                f"vLLM runs out of memory at start even at --gpu-memory-utilization "
                f"{util:.2f} and --max-model-len {length} (floors {lim.min_utilization:.2f} and "
                f"{lim.min_max_model_len}): {oom.message}. Free GPU memory held by other "
                "processes, or plan a smaller model.",
                log_tail=exc.log_tail,
                returncode=exc.returncode,
                retryable=False,
            ) from exc
        why = (
            f"vLLM ran out of memory at start ({oom.message[:160]}): {step.setting} "
            f"{step.old} -> {step.new}, as the DGX Spark playbooks advise"
        )
        reason = Reason(setting=step.setting, value=step.new, why=why, source="planner")
        self.argv = set_flag(self.argv, step.setting, step.new)
        self._plan = self._plan.model_copy(
            update={
                "gpu_memory_utilization": step.utilization,
                "max_model_len": step.max_model_len,
                "argv": set_flag(self._plan.argv, step.setting, step.new),
                "reasons": [*self._plan.reasons, reason],
            }
        )
        self.step_downs.append(reason)
        log.warning("%s", why)
        if self._on_step_down is not None:
            self._on_step_down(reason)
