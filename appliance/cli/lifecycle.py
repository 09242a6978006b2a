"""`appliance up`: bring the appliance to its planned state."""

from __future__ import annotations

import typer

from appliance.cli.context import app_context
from appliance.cli.output import console


def up(ctx: typer.Context) -> None:
    """Initialise the state store, plan serving from live telemetry and record the plan.

    The backend and gateway processes this plan starts arrive with the inference subsystem.
    """
    from appliance.cli.plan import current_plan
    from appliance.store import open_store

    config = app_context(ctx).config()
    plan = current_plan(ctx)
    with open_store(config.state_dir) as store:
        store.record_plan(plan.backend, plan.model, plan.model_dump(mode="json"))
        version = store.schema_version
    console.print(
        f"state store {config.state_dir} (schema v{version}); "
        f"plan recorded: {plan.backend} · {plan.variant} · {plan.model}"
    )
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
