"""`appliance notify`: the webhooks the control plane pushes notifications to (config
`notify.webhooks`), and a test delivery to one of them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.context import control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json, when
from appliance.errors import ApplianceError

app = typer.Typer(
    help="Webhook notifications: list the webhooks, send one a test event.",
    no_args_is_help=True,
)


def _outcome(last: dict[str, Any] | None) -> str:
    if last is None:
        return "-"
    status = f"HTTP {last['status']}" if last.get("status") is not None else "no answer"
    what = "[green]delivered[/]" if last["ok"] else f"[red]failed[/] ({escape(last['error'])})"
    tries = "1 attempt" if last["attempts"] == 1 else f"{last['attempts']} attempts"
    return f"{escape(last['notification'])} {what}, {status}, {tries}, {when(last['at'])}"


@app.command("list")
def list_webhooks(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the webhooks (never their secrets) and each one's last delivery."""
    with control_client(ctx) as client:
        hooks = client.webhooks()
    if json_out:
        print_json(hooks)
        return
    if not hooks:
        console.print("no webhooks: add notify.webhooks to the config (see the README)")
        return
    table = Table("name", "format", "url", "events", "last delivery", box=None)
    for hook in hooks:
        fmt = hook["format"] + ("" if hook["signed"] else " (unsigned)")
        events = ", ".join(hook["events"])
        table.add_row(
            escape(hook["name"]), fmt, escape(hook["url"]), escape(events), _outcome(hook["last"])
        )
    console.print(table)


@app.command("test")
def test(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The webhook's name (`appliance notify list`).")],
    json_out: JsonOpt = False,
) -> None:
    """Send a `test` event to a webhook now, once, and say how the receiver answered."""
    with control_client(ctx) as client:
        outcome = client.test_webhook(name)
    if json_out:
        print_json(outcome)
    if not outcome["ok"]:
        raise ApplianceError(
            f"the test notification to {name} failed: {outcome['error']}",
            hint="check the receiver and the webhook's url and secret; every delivery is in "
            "`appliance audit tail --event 'notify.*'`",
        )
    if not json_out:
        console.print(
            f"delivered a test notification to [bold]{escape(name)}[/] (HTTP {outcome['status']})"
        )
