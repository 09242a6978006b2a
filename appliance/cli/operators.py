"""`appliance operators`: who may use the control plane's loopback port (tokens, roles)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from appliance.cli.context import control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json, print_secret_once, revocation_cell, when

app = typer.Typer(
    help="Create, list and revoke operators of the control plane's API port.",
    no_args_is_help=True,
)


class RoleChoice(StrEnum):
    viewer = "viewer"  # reads: status, sandboxes, budgets, the audit log
    operator = "operator"  # also acts: sandboxes, approvals, kills, agents, budgets
    admin = "admin"  # also keys and operators


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who holds the token (the name rule of keys).")],
    role: Annotated[RoleChoice, typer.Option("--role", help="What the token may do.")],
    json_out: JsonOpt = False,
) -> None:
    """Create an operator and print its token (`Authorization: Bearer …` on control.port): it
    is shown this once and stored only hashed."""
    from appliance.store.names import check_operator_name

    check_operator_name(name)  # a usage error, without a round trip
    with control_client(ctx) as client:
        made = client.create_operator(name, role.value)
    if json_out:
        print_json(made)
        return
    console.print(f"created {made['role']} [bold]{made['name']}[/]")
    print_secret_once(made["secret"], "token")


@app.command("list")
def list_operators(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the operators (their tokens are never shown again)."""
    with control_client(ctx) as client:
        operators = client.operators()
    if json_out:
        print_json(operators)
        return
    if not operators:
        console.print("no operators yet: `appliance operators create NAME --role viewer`")
        return
    table = Table("name", "role", "created", "state", box=None)
    for op in operators:
        table.add_row(
            op["name"], op["role"], when(op["created_at"]), revocation_cell(op["revoked_at"])
        )
    console.print(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The operator's name.")]
) -> None:
    """Revoke an operator: its token is refused from the next request on."""
    with control_client(ctx) as client:
        revoked = client.revoke_operator(name)
    console.print(f"revoked operator [bold]{revoked['name']}[/]")
