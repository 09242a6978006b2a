"""`appliance keys`: API keys for inference.local, one per client or sandbox, stored hashed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json
from appliance.errors import NotFoundError
from inference.ports import KeyRecord

if TYPE_CHECKING:
    from appliance.store.inference_store import InferenceStore

app = typer.Typer(help="Create, list and revoke inference.local API keys.", no_args_is_help=True)


def open_inference_store(ctx: typer.Context) -> InferenceStore:
    from appliance.store.inference_store import InferenceStore  # lazy: keeps the CLI quick

    return InferenceStore(app_context(ctx).config().state_dir)


def key_data(key: KeyRecord) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "owner_kind": key.owner_kind,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "state": "revoked" if key.revoked_at else "live",
        # null: any model; a list: only these (as resolved by the gateway's aliases)
        "allowed_models": None if key.allowed_models is None else list(key.allowed_models),
        "scopes": list(key.scopes),  # e.g. ["metrics"]: may scrape the gateway's /metrics
    }


def _models_cell(key: KeyRecord) -> str:
    return "any" if key.allowed_models is None else ", ".join(key.allowed_models) or "none"


def _warn_unserved(ctx: typer.Context, models: list[str]) -> None:
    """A name the gateway cannot resolve now allows nothing until the config names it: say so
    (a warning, not an error: the config may be about to change)."""
    if not models:
        return
    from inference.gateway.routing import Router

    router = Router(app_context(ctx).config().gateway_settings())
    for name in models:
        if router.resolve(name) is None:
            err_console.print(
                f"[yellow]warning:[/] model {escape(repr(name))} is not served here (not the "
                "served model, an alias or an upstream model): it allows nothing until the "
                "config names it"
            )


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


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
    from appliance.names import check_key_name
    from appliance.store.inference_store import check_scopes

    check_key_name(name, "sandbox" if sandbox else "client")  # before the store is opened
    check_scopes(scope or (), "sandbox" if sandbox else "client")  # the same: a usage error
    with open_inference_store(ctx) as store:
        key, secret = store.create_key(
            name, "sandbox" if sandbox else "client", allow_model or None, scope or ()
        )
    _warn_unserved(ctx, list(key.allowed_models or ()))
    if json_out:
        print_json({**key_data(key), "secret": secret})
        return
    console.print(f"created {key.owner_kind} key [bold]{key.name}[/] ({key.id})")
    console.print(f"models: {_models_cell(key)}", markup=False)
    if key.scopes:
        console.print(f"scopes: {', '.join(key.scopes)}", markup=False)
    console.print(secret, markup=False, soft_wrap=True)
    console.print("[yellow]store this secret now: it is not shown again[/]")


@app.command("list")
def list_keys(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List every key (the secrets are never shown again)."""
    with open_inference_store(ctx) as store:
        keys = store.list_keys()
    if json_out:
        print_json([key_data(k) for k in keys])
        return
    if not keys:
        console.print("no keys yet: `appliance keys create NAME`")
        return
    table = Table("name", "id", "owner", "models", "created", "state", box=None)
    for k in keys:
        state = f"[red]revoked {_when(k.revoked_at)}[/]" if k.revoked_at else "[green]live[/]"
        models = escape(_models_cell(k))  # names may hold brackets: never rich markup
        table.add_row(k.name, k.id, k.owner_kind, models, _when(k.created_at), state)
    console.print(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="Key name or id.", metavar="NAME_OR_ID")],
) -> None:
    """Revoke a key: the gateway refuses it within a second."""
    with open_inference_store(ctx) as store:
        revoked = store.revoke_key(key)
    if revoked is None:
        raise NotFoundError(
            f"no live key named or with id {key!r}", hint="`appliance keys list` shows the keys"
        )
    console.print(f"revoked key [bold]{revoked.name}[/] ({revoked.id})")
