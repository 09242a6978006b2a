"""`appliance blueprint list|show|validate|diff|schema|upgrade|rollback`: versioned blueprints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json

app = typer.Typer(help="Versioned agent blueprints.", no_args_is_help=True)

RefArg = Annotated[
    str, typer.Argument(help="NAME (newest version), NAME@VERSION, or a blueprint.yaml path.")
]


def catalog(ctx: typer.Context):
    from blueprints.catalog import Catalog

    return Catalog(app_context(ctx).config().blueprints.dirs)


def resolve(ctx: typer.Context, ref: str, compatible: bool = False):
    """A catalog reference or a file, read here as the operator (these commands only read);
    `compatible`: one this appliance can run, or an error."""
    from appliance import __version__
    from appliance.errors import blueprint_errors
    from blueprints.resolve import check_compatible, resolve_blueprint

    with blueprint_errors():
        blueprint = resolve_blueprint(catalog(ctx), ref)
        if compatible:
            check_compatible(blueprint, __version__)
        return blueprint


@app.command("list")
def list_(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every blueprint and version in the catalog (and the configured user dirs)."""
    from appliance.errors import blueprint_errors

    with blueprint_errors():
        cat = catalog(ctx)
        rows = []
        for e in cat.entries():
            bp = cat.get(f"{e.name}@{e.version}")
            rows.append(
                {
                    "name": e.name,
                    "version": e.version,
                    "runtime": bp.runtime.kind,
                    "description": bp.description,
                    "digest": bp.digest(),
                    "path": str(e.path),
                }
            )
    if json_out:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "version", "runtime", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["version"], r["runtime"], r["description"])
    console.print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    ref: RefArg,
    policy: Annotated[bool, typer.Option(help="Print the resolved sandbox policy too.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A blueprint as loaded (defaults filled in: tools, schedule, lifecycle), its digest, the
    tool policy its runtime gets, and optionally its resolved sandbox policy."""
    from blueprints.runtimes.tools import KNOWN_NAMES, render_tools

    bp = resolve(ctx, ref)
    out: dict[str, Any] = {"digest": bp.digest(), "blueprint": bp.model_dump(mode="json")}
    if KNOWN_NAMES.get(bp.runtime.kind):  # a runtime with a tool policy
        out["tool_policy"] = render_tools(bp.tools)
    if policy:
        out["policy"] = bp.policy().model_dump(mode="json")
    if json_out:
        print_json(out)
        return
    import yaml

    console.print(f"[bold]{bp.ref}[/] {out['digest']}", highlight=False)
    console.print(yaml.safe_dump(out["blueprint"], sort_keys=False).rstrip(), highlight=False)
    if "tool_policy" in out:
        console.print("[bold]tool policy the runtime gets[/] (always denied: self-scheduling)")
        console.print(yaml.safe_dump(out["tool_policy"], sort_keys=False).rstrip(), highlight=False)
    if policy:
        console.print("[bold]resolved policy[/]")
        console.print(yaml.safe_dump(out["policy"], sort_keys=False).rstrip(), highlight=False)


@app.command("validate")
def validate(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="blueprint.yaml")],
    json_out: JsonOpt = False,
) -> None:
    """Check a blueprint file: schema, policy rules, presets, versions (errors as file:line)."""
    bp = resolve(ctx, str(path), compatible=True)
    if json_out:
        print_json({"valid": True, "ref": bp.ref, "digest": bp.digest()})
    else:
        console.print(f"{path}: {bp.ref} is valid · {bp.digest()}", highlight=False)


@app.command("diff")
def diff(ctx: typer.Context, old: RefArg, new: RefArg, json_out: JsonOpt = False) -> None:
    """What changes from OLD to NEW, as written and in the resolved sandbox policy."""
    from blueprints.diff import diff as diff_blueprints
    from blueprints.diff import recreates

    a, b = resolve(ctx, old), resolve(ctx, new)
    changes = diff_blueprints(a, b)
    if json_out:
        print_json(
            {
                "old": a.ref,
                "new": b.ref,
                "recreates_sandbox": recreates(changes),
                "changes": [c.as_dict() for c in changes],
            }
        )
        return
    if not changes:
        console.print(f"{a.ref} and {b.ref} are the same")
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("path", a.ref, b.ref):
        table.add_column(col, overflow="fold")
    for c in changes:
        table.add_row(c.path, json.dumps(c.old), json.dumps(c.new))
    console.print(table)
    if recreates(changes):
        console.print(
            "applying this re-creates the sandbox "
            "(static policy, image, runtime, tool policy or lifecycle)"
        )


@app.command("schema")
def schema() -> None:
    """The blueprint JSON Schema (generated from the model), for editors and CI."""
    from blueprints.model import Blueprint

    print_json(Blueprint.model_json_schema())


@app.command("upgrade")
def upgrade(
    ctx: typer.Context,
    sandbox: Annotated[str, typer.Argument(help="The agent (sandbox) to move.")],
    to: Annotated[
        str | None,
        typer.Option("--to", help="VERSION, NAME@VERSION or a blueprint.yaml (default: newest)."),
    ] = None,
) -> None:
    """Re-create an agent's sandbox on another blueprint version, keeping its home and
    persisted approvals; if the new one fails to start, the old one is restored."""
    from appliance.cli.agent import blueprint_arg
    from appliance.cli.context import control_client

    ref, text, source = blueprint_arg(to) if to else (None, None, "")
    with control_client(ctx) as client:
        dep = client.upgrade_agent(sandbox, ref, text, source)
    console.print(f"{sandbox} now runs {dep['blueprint']}")


@app.command("rollback")
def rollback(
    ctx: typer.Context, sandbox: Annotated[str, typer.Argument(help="The agent (sandbox).")]
) -> None:
    """Go back to the blueprint version the agent ran before its last upgrade."""
    from appliance.cli.context import control_client

    with control_client(ctx) as client:
        dep = client.rollback_agent(sandbox)
    console.print(f"{sandbox} is back on {dep['blueprint']}")
