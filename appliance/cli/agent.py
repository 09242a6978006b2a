"""`appliance agent create|run|chat|logs|transcript|list|rm`: agents made from blueprints."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json

app = typer.Typer(
    help="Agents: a sandbox, a key and a budget from a blueprint.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Agent name.", metavar="NAME")]


@contextmanager
def agents(ctx: typer.Context) -> Iterator:
    from appliance.agents import AgentManager
    from appliance.sandboxes import ensure_ready
    from appliance.store import open_store

    config = app_context(ctx).config()
    ensure_ready(config)
    with open_store(config.state_dir) as store:
        yield AgentManager(config, store)


def _progress(line: str) -> None:
    err_console.print(f"[dim]{line}[/]", highlight=False)


@app.command("create")
def create(
    ctx: typer.Context,
    name: NameArg,
    blueprint: Annotated[
        str, typer.Option("--blueprint", "-b", help="NAME[@VERSION] or a blueprint.yaml path.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Create the agent's sandbox (image, policy, key, budget) from a blueprint and start it.
    NAME: 1-63 of a-z, 0-9 and '-'. All or nothing: a failure leaves nothing behind."""
    from appliance.names import check_name

    check_name(name, "agent")  # before anything is opened or written
    with agents(ctx) as m:
        dep = m.create(name, blueprint, progress=_progress)
        report = m.sandboxes.enforcement(name) or {}
    if json_out:
        print_json({"name": name, "blueprint": dep.ref, "digest": dep.digest, "image": dep.image,
                    "enforcement": report})  # fmt: skip
        return
    ll = report.get("landlock", {})
    console.print(
        f"agent {name} running {dep.ref} · Landlock ABI {ll.get('abi')} "
        f"enforced={ll.get('enforced')} · seccomp {report.get('seccomp_mode')}"
    )


@app.command("run")
def run(
    ctx: typer.Context,
    name: NameArg,
    message: Annotated[str, typer.Argument(help="The message; - reads it from stdin.")],
    session: Annotated[
        str | None, typer.Option(help="Continue this session (default: a new one).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """One non-interactive turn: the reply is printed (`--json`: the whole record)."""
    if message == "-":
        message = sys.stdin.read()
    with agents(ctx) as m:
        result = m.run(name, message, session=session)
    if json_out:
        print_json(result.as_dict())
    elif result.ok:
        console.print(result.reply, highlight=False, markup=False)
    if not result.ok:
        from appliance.agents import AgentError

        detail = (result.raw or {}).get("error") or result.stderr_tail.strip().splitlines()[-1:]
        raise AgentError(f"the turn failed (exit {result.exit_code}): {detail}")


@app.command("chat")
def chat(ctx: typer.Context, name: NameArg) -> None:
    """An interactive session: one turn per line you type, all in one OpenClaw session (it
    remembers the conversation); Ctrl-D ends it."""
    session = time.strftime("chat-%Y%m%d-%H%M%S")
    with agents(ctx) as m:
        while True:
            try:
                message = console.input("[bold]you>[/] ")
            except EOFError:
                console.print()
                return
            if not message.strip():
                continue
            result = m.run(name, message, session=session)
            console.print(
                f"[bold]{name}>[/] {result.reply}"
                if result.ok
                else f"[red]failed[/] "
                f"(exit {result.exit_code}): {result.stderr_tail.strip()[-300:]}",
                highlight=False,
            )


@app.command("transcript")
def transcript(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Every turn of the agent, as recorded on the host."""
    with agents(ctx) as m:
        turns = m.transcript(name)
    if json_out:
        print_json(turns)
        return
    for t in turns:
        console.print(f"[bold]you>[/] {t['message']}", highlight=False)
        console.print(f"[bold]{name}>[/] {t['reply'] or '(no reply: ' + str(t['exit_code']) + ')'}",
                      highlight=False)  # fmt: skip


@app.command("logs")
def logs(ctx: typer.Context, name: NameArg) -> None:
    """The agent sandbox's output (PID 1 and the agent's main command)."""
    with agents(ctx) as m:
        chunks = m.sandboxes.container(name).logs(stdout=True, stderr=True)
        sys.stdout.write(b"".join(chunks).decode(errors="replace"))


@app.command("list")
def list_(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every agent with its blueprint, state, turns and tokens today."""
    with agents(ctx) as m:
        rows = m.inventory()
    if json_out:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "blueprint", "state", "turns", "tokens today"):
        table.add_column(col)
    for r in rows:
        budget = f" / {r['daily_budget']}" if r["daily_budget"] else ""
        table.add_row(r["name"], r["blueprint"], r["state"], str(r["turns"]),
                      f"{r['tokens_today']}{budget}")  # fmt: skip
    console.print(table)


@app.command("rm")
def rm(ctx: typer.Context, name: NameArg) -> None:
    """Remove the agent: its sandbox, key and home (the transcript stays on the host)."""
    with agents(ctx) as m:
        m.remove(name)
    console.print(f"removed {name}")
