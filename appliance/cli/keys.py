"""`appliance keys`: API keys for inference.local, one per client or sandbox, stored hashed."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.context import control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import (
    console,
    err_console,
    print_json,
    print_secret_once,
    revocation_cell,
    when,
)

app = typer.Typer(help="Create, list and revoke inference.local API keys.", no_args_is_help=True)


def _models_cell(key: dict[str, Any]) -> str:
    models = key["allowed_models"]
    return "any" if models is None else ", ".join(models) or "none"


def _warn(warnings: list[str]) -> None:
    """The control plane's warnings (a model not served here): on stderr, so --json is the
    key alone."""
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for the client or sandbox using the key.")],
    sandbox: Annotated[
        bool, typer.Option("--sandbox", help="The key belongs to a sandbox, not a client.")
    ] = False,
    allow_model: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-model",
            metavar="NAME",
            help="Only this model (a served name or alias; repeatable). Default: any model.",
        ),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            metavar="SCOPE",
            help="Also allow SCOPE: `metrics` (GET /metrics on the gateway). Not for sandboxes.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a key and print its secret: it is shown this once and stored only hashed.
    NAME: 1-63 of a-z, 0-9 and '-', starting with a letter or digit."""
    from appliance.store.names import check_key_name, check_scopes

    owner_kind = "sandbox" if sandbox else "client"
    check_key_name(name, owner_kind)  # usage errors first, without a round trip
    check_scopes(scope or (), owner_kind)
    with control_client(ctx) as client:
        key = client.create_key(name, owner_kind, allow_model or None, scope or [])
    _warn(key.pop("warnings", []))
    if json_out:
        print_json(key)
        return
    console.print(f"created {key['owner_kind']} key [bold]{key['name']}[/] ({key['id']})")
    console.print(f"models: {_models_cell(key)}", markup=False)
    if key["scopes"]:
        console.print(f"scopes: {', '.join(key['scopes'])}", markup=False)
    print_secret_once(key["secret"], "secret")


@app.command("list")
def list_keys(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List every key (the secrets are never shown again)."""
    with control_client(ctx) as client:
        keys = client.keys()
    if json_out:
        print_json(keys)
        return
    if not keys:
        console.print("no keys yet: `appliance keys create NAME`")
        return
    table = Table("name", "id", "owner", "models", "created", "state", box=None)
    for k in keys:
        models = escape(_models_cell(k))  # names may hold brackets: never rich markup
        state = revocation_cell(k["revoked_at"])
        table.add_row(k["name"], k["id"], k["owner_kind"], models, when(k["created_at"]), state)
    console.print(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.", metavar="NAME_OR_ID")],
) -> None:
    """Revoke a key: the gateway refuses it within a second."""
    with control_client(ctx) as client:
        revoked = client.revoke_key(key)
    console.print(f"revoked key [bold]{revoked['name']}[/] ({revoked['id']})")
