"""`appliance agent create|run|chat|logs|transcript|schedule|list|stop|start|rm`: agents made from
blueprints, through the control plane's API (which owns them)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.context import control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json
from appliance.errors import ApplianceError, TurnRefused

app = typer.Typer(
    help="Agents: a sandbox, a key and a budget from a blueprint.", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Agent name.", metavar="NAME")]
TURN_FAILED_HINT = "see `appliance agent logs NAME` and `appliance sandbox logs NAME`"
# What the agent writes must not drive the operator's terminal (clear it, set the clipboard with
# OSC 52, retitle it, hide text with \r): escape sequences whole (CSI, OSC/DCS/APC/PM/SOS up to
# their terminator, two-byte ESC X), then every other C0/C1 control but \n and \t, and DEL.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]"  # two-byte (and nF) sequences
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    r"""`text` (the agent's) with no escape sequence or control character but \n and \t."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def blueprint_arg(ref: str) -> tuple[str | None, str | None, str]:
    """(reference, None, "") for a catalog reference; (None, YAML text, file name) for a file,
    read here as the operator and checked first (a bad one fails with FILE:LINE before anything
    is sent; the control plane parses the text again). The control plane opens no path."""
    from appliance.errors import blueprint_errors
    from blueprints.catalog import load_blueprint
    from blueprints.resolve import is_path_ref

    if not is_path_ref(ref):
        return ref, None, ""
    path = Path(ref)
    with blueprint_errors():
        load_blueprint(path)  # cannot read, not UTF-8, bad YAML, bad blueprint: FILE:LINE
    return None, path.read_text(encoding="utf-8"), ref


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
    from sandbox.names import check_name

    check_name(name, "agent")  # before anything is read or sent
    ref, text, source = blueprint_arg(blueprint)
    with control_client(ctx) as client:  # a first use builds the image: minutes
        out = client.create_agent(name, ref, text, source)
    if json_out:
        print_json(out)
        return
    report = out.get("enforcement") or {}
    ll = report.get("landlock", {})
    console.print(
        f"agent {name} running {out['blueprint']} · Landlock ABI {ll.get('abi')} "
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
    """One non-interactive turn: the reply is printed as it comes (`--json`: the whole record,
    at the end). Refused (held, stopped, over budget, runtime down): exit 12, with the reason."""
    if message == "-":
        message = sys.stdin.read()
    reply = None if json_out else _Reply()
    with control_client(ctx) as client:
        done = _take_turn(client.stream_turn(name, message, session=session), reply)
    if reply is not None:
        reply.end()
        _print_notices(done, set())
    else:
        print_json(done)
    if not done["ok"]:
        raise ApplianceError(_failure(done), hint=TURN_FAILED_HINT)


@app.command("chat")
def chat(ctx: typer.Context, name: NameArg) -> None:
    """An interactive session: one turn per line you type, all in one session (the runtime
    remembers the conversation), each reply printed as it comes; Ctrl-D ends it."""
    session = time.strftime("chat-%Y%m%d-%H%M%S")
    noticed: set[str] = set()
    with control_client(ctx) as client:
        while True:
            try:
                message = console.input("[bold]you>[/] ")
            except EOFError:
                console.print()
                return
            if not message.strip():
                continue
            console.print(f"[bold]{name}>[/] ", end="")
            reply = _Reply()
            try:
                done = _take_turn(client.stream_turn(name, message, session=session), reply)
            except TurnRefused as refused:  # the session goes on: it may be released
                console.print(f"[red]refused[/]: {escape(str(refused))}", highlight=False)
                if refused.hint:
                    console.print(f"  [dim]hint: {escape(refused.hint)}[/]", highlight=False)
                continue
            reply.end()
            if not done["ok"]:
                console.print(f"[red]failed[/]: {escape(_failure(done))}", highlight=False)
            _print_notices(done, noticed)


class _Reply:
    """Reply text written as it streams in (no wrapping, no markup), ended by one newline; to a
    terminal, without the agent's escape sequences and control characters (terminal_safe). A
    pipe or a file gets the text as the agent wrote it."""

    def __init__(self) -> None:
        self.last = "\n"
        self.tty = sys.stdout.isatty()

    def write(self, text: str) -> None:
        if self.tty:
            text = terminal_safe(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text[-1]

    def end(self) -> None:
        if self.last != "\n":
            self.write("\n")


def _take_turn(events: Iterator[dict[str, Any]], reply: _Reply | None) -> dict[str, Any]:
    """The turn's done record (without what only the transport needs); deltas written to
    `reply` as they come."""
    for event in events:
        if event["type"] == "delta" and reply is not None:
            reply.write(event["text"])
        elif event["type"] == "done":
            event.pop("type")
            event.pop("stderr_tail", None)  # in the API's answer, not in the record
            return event
    raise AssertionError("stream_turn ends with the done record or raises")


def _failure(done: dict[str, Any]) -> str:
    code = done.get("exit_code")
    error = terminal_safe(str(done.get("error")))  # the runtime's words, on one error line
    return f"the turn failed{f' (exit {code})' if code is not None else ''}: {error}"


def _print_notices(done: dict[str, Any], shown: set[str]) -> None:
    """Each notice once (dim, on stderr): e.g. that the demonstration model answered."""
    for notice in done.get("notices") or []:
        if notice not in shown:
            shown.add(notice)
            err_console.print(f"[dim]{escape(notice)}[/]", highlight=False)


@app.command("transcript")
def transcript(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Every turn of the agent, as recorded on the host."""
    with control_client(ctx) as client:
        turns = client.agent_transcript(name)
    if json_out:
        print_json(turns)
        return
    for t in turns:
        asker = "you" if t.get("trigger", "manual") == "manual" else t["trigger"]
        message, reply = t["message"], _recorded_reply(t)
        if console.is_terminal:
            message, reply = terminal_safe(message), terminal_safe(reply)
        console.print(f"[bold]{asker}>[/] {escape(message)}", highlight=False)
        console.print(f"[bold]{name}>[/] {escape(reply)}", highlight=False)


def _recorded_reply(turn: dict[str, Any]) -> str:
    if turn.get("refused"):
        return f"(refused: {turn['refused']})"
    if turn.get("cancelled"):
        return f"(cancelled) {turn['reply']}"
    return turn["reply"] or f"(no reply: {turn.get('error') or turn.get('exit_code')})"


@app.command("schedule")
def schedule(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """The agent's blueprint schedule: each entry's next and last run, and how that went."""
    from rich.markup import escape

    with control_client(ctx) as client:
        entries = client.agent_schedule(name)
    if json_out:
        print_json(entries)
        return
    if not entries:
        console.print(f"{escape(name)} has no schedule (its blueprint's `schedule:` is empty)")
        return
    table = Table("#", "when", "session", "prompt", "next run", "last run", "outcome")
    for e in entries:
        when = f"every {e['every']}" if e.get("every") else f"cron {e['cron']}"
        when += f" {e['tz']}" if e.get("tz") and e["tz"] != "UTC" else ""
        if e.get("active_hours"):
            when += f" ({e['active_hours']['start']}-{e['active_hours']['end']})"
        outcome = e.get("last_outcome") or "-"
        if e.get("last_reason"):
            outcome += f": {e['last_reason']}"
        if e.get("last_skip_at"):  # beside the last run's outcome: a skip hides none
            outcome += f"\nlast skipped {_at(e['last_skip_at'])}: {e.get('last_skip_reason')}"
        prompt = e["prompt"] if len(e["prompt"]) <= 40 else e["prompt"][:39] + "…"
        cells = (when, e["session"], prompt, _at(e.get("next_run_at")), _at(e.get("last_run_at")))
        table.add_row(str(e["index"]), *(escape(c) for c in cells), escape(outcome))
    console.print(table)


def _at(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@app.command("logs")
def logs(ctx: typer.Context, name: NameArg) -> None:
    """The agent sandbox's output (PID 1 and the agent's main command)."""
    with control_client(ctx) as client:
        sys.stdout.write(client.sandbox_logs(name))


@app.command("list")
def list_(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every agent with its blueprint, state, runtime, turns and tokens today."""
    with control_client(ctx) as client:
        rows = client.agents()
    if json_out:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "blueprint", "state", "runtime", "turns", "tokens today"):
        table.add_column(col)
    for r in rows:
        budget = f" / {r['daily_budget']}" if r["daily_budget"] else ""
        table.add_row(r["name"], r["blueprint"], r["state"], _runtime(r.get("runtime")),
                      str(r["turns"]), f"{r['tokens_today']}{budget}")  # fmt: skip
    console.print(table)


def _runtime(view: dict[str, Any] | None) -> str:
    """`running`, `fail_closed`, `backoff (2 restarts)`; `-` with no runtime report."""
    if not view:
        return "-"
    restarts = view.get("restarts") or 0
    if not restarts:
        return str(view["state"])
    return f"{view['state']} ({restarts} restart{'' if restarts == 1 else 's'})"


def _state(row: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(row)
    else:
        console.print(f"{row['name']} {row['state']} ({row['blueprint']})", highlight=False)


@app.command("stop")
def stop(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Stop the agent's sandbox (and its egress proxy); its home, key and history stay."""
    with control_client(ctx) as client:
        _state(client.stop_agent(name), json_out)


@app.command("start")
def start(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Start a stopped agent's sandbox again (refused while the kill switch holds)."""
    with control_client(ctx) as client:
        _state(client.start_agent(name), json_out)


@app.command("rm")
def rm(ctx: typer.Context, name: NameArg) -> None:
    """Remove the agent: its sandbox, key and home (the transcript stays on the host)."""
    with control_client(ctx) as client:
        client.remove_agent(name)
    console.print(f"removed {name}")
