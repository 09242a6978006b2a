"""`appliance plan`: which model and vLLM settings this host gets, and why."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.padding import Padding

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt, SnapshotOpt
from appliance.cli.output import console, print_json
from appliance.errors import ConfigError
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostSnapshot

SNAPSHOT_HINT = "give a HostSnapshot JSON file: `appliance hardware --json` writes one"


def load_snapshot(path: Path) -> HostSnapshot:
    """A recorded host; anything else is one line naming the file (and the field)."""
    from pydantic import ValidationError

    try:
        return HostSnapshot.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = f"{path}: {loc}" if loc else str(path)
        raise ConfigError(f"{where}: {first['msg']}", hint=SNAPSHOT_HINT) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text", hint=SNAPSHOT_HINT) from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}", hint=SNAPSHOT_HINT) from None


def current_plan(
    ctx: typer.Context, host: HostSnapshot | None = None, **flags: object
) -> ServingPlan:
    """The plan for `host` (default: this machine, live) with config and flag overrides applied."""
    from hardware.planner import plan_serving
    from hardware.telemetry import collect

    config = app_context(ctx).config(**flags)
    host = host or collect()
    # `auto` and `container` plan alike: the planner's pick (where it runs: serving_path)
    if config.inference.backend == "embedded" and host.gpus:
        why = "inference.backend is 'embedded' in the config: GPUs left unused"
        host = host.model_copy(update={"gpus": [], "nvml_error": why})
    elif config.inference.backend == "vllm" and not host.gpus:
        raise ConfigError(
            f"inference.backend is 'vllm' but this host has no usable GPU ({host.nvml_error})",
            hint="set inference.backend to auto or embedded",
        )
    return plan_serving(
        host,
        config.inference.vllm,
        served_model_name=config.inference.served_model_name,
        host_addr=config.inference.backend_listen.host,
        port=config.inference.backend_listen.port,
        embedded_context=config.inference.embedded_context,
    )


def render_plan(plan: ServingPlan) -> None:
    console.print(f"[bold]{plan.backend}[/] · {plan.variant} · {plan.model}\n")
    for r in plan.reasons:
        tag = "[bold yellow]override[/]" if r.source == "override" else f"[dim]{r.source}[/]"
        console.print(f"[bold]{escape(r.setting)}[/] = {escape(r.value)}  {tag}")
        console.print(Padding(escape(r.why), (0, 0, 0, 4)))
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if plan.argv:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
        console.print("\n" + (env + " " if env else "") + shlex.join(plan.argv), soft_wrap=True)


def plan(
    ctx: typer.Context,
    snapshot: SnapshotOpt = None,
    model: Annotated[str | None, typer.Option(help="Override the model variant or HF id.")] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="Override --gpu-memory-utilization.")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Override --max-model-len.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Override --max-num-seqs.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Choose the model variant and vLLM settings from live telemetry and explain each choice."""
    overrides = {
        "model": model,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
    }
    flags = (
        {"inference": {"vllm": overrides}} if any(v is not None for v in overrides.values()) else {}
    )
    result = current_plan(ctx, load_snapshot(snapshot) if snapshot else None, **flags)
    if json_out:
        print_json(result)
    else:
        render_plan(result)
