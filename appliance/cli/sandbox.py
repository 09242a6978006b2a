"""`appliance sandbox`, `approvals`, `kill`/`release`: agents' sandboxes, as a client of the
control plane's API (appliance/control/api/sandboxes.py, approvals.py, kill.py). The control plane
decides and acts; these commands parse, send and print. Nothing running: exit 7, `appliance up`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json

if TYPE_CHECKING:
    from appliance.control.client import ControlClient

app = typer.Typer(help="Create and manage agent sandboxes (rootless Podman).", no_args_is_help=True)
policy_app = typer.Typer(help="Show or change a sandbox's policy.", no_args_is_help=True)
approvals_app = typer.Typer(help="Pending egress approvals.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

NameArg = Annotated[str, typer.Argument(help="Sandbox name.", metavar="NAME")]


@contextmanager
def control(ctx: typer.Context) -> Iterator[ControlClient]:
    from appliance.control.client import ControlClient

    with ControlClient(app_context(ctx).config()) as client:
        yield client


def _named(name: str) -> str:
    """`name` as sent in a URL: the empty name names no sandbox and cannot be sent (an
    older store's '' record is reported by `sandbox reconcile`, never removed through it)."""
    if not name:
        from sandbox.names import check_name

        check_name(name, "sandbox")
    return name


def _policy_text(path: Path) -> str:
    """The file's text, parsed here first: a bad file fails with FILE:LINE before anything is
    sent (the control plane parses it again; it trusts no client)."""
    from appliance.errors import ConfigError
    from sandbox.policy import load_policy  # the policy model only: not the lifecycle, not podman
    from sandbox.yamlfile import YamlError

    try:
        load_policy(path)
    except YamlError as exc:
        raise ConfigError(str(exc), hint="fix the policy file at the line named") from None
    return path.read_text(encoding="utf-8")


@app.command("create")
def create(
    ctx: typer.Context,
    name: NameArg,
    policy: Annotated[Path, typer.Option("--policy", exists=True, dir_okay=False)],
    command: Annotated[list[str] | None, typer.Argument(help="Agent command (after --).")] = None,
    image: Annotated[str | None, typer.Option(help="Image (default: the base image).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create and start a sandbox whose limits come from POLICY (YAML). NAME: 1-63 of a-z, 0-9
    and '-', starting with a letter or digit. All or nothing: a failure leaves nothing behind."""
    from sandbox.names import check_name

    check_name(name, "sandbox")  # before anything is read, opened or sent
    text = _policy_text(policy)
    with control(ctx) as client:
        out = client.create_sandbox(name, text, str(policy), command or None, image)
    report = out.get("enforcement")
    if json_out:
        print_json({"name": out["name"], "state": out["state"], "enforcement": report})
        return
    ll = (report or {}).get("landlock", {})
    console.print(
        f"sandbox {name} running · Landlock ABI {ll.get('abi')} enforced={ll.get('enforced')}"
        f" · seccomp {report and report.get('seccomp_mode')}"
    )
    limits = (report or {}).get("limits", {})
    if limits and limits.get("cgroup_memory") is None:
        err_console.print(
            "[yellow]warning:[/] no cgroup memory/pids limit on this host (rootless Podman "
            "needs cgroup v2 with delegation): each process is capped by rlimits instead"
        )


@app.command("list")
def list_(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every sandbox with its recorded and its Podman state."""
    with control(ctx) as client:
        rows = client.sandboxes()
    if json_out:
        print_json(rows)
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("name", "state", "podman", "command"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["state"], r["container"], " ".join(r["command"]))
    console.print(table)


@app.command("exec")
def exec_(
    ctx: typer.Context, name: NameArg, command: Annotated[list[str], typer.Argument()]
) -> None:
    """Run a command in the sandbox as the agent: seccomp, dropped caps and the agent's Landlock
    domain apply, as to the agent itself. Stdin is read to its end and sent with the command
    (not a terminal session); the output is printed when it ends and the exit status is the
    command's."""
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    with control(ctx) as client:
        code, out, err, truncated = client.sandbox_exec(_named(name), command, stdin)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()
    if truncated:  # the control plane keeps 8 MiB of each stream, then stops the command
        err_console.print(
            "appliance: warning: the output was truncated at 8 MiB and the command stopped"
        )
    raise typer.Exit(code)


@app.command("logs")
def logs(
    ctx: typer.Context,
    name: NameArg,
    tail: Annotated[
        int, typer.Option("--tail", min=0, max=100_000, help="The last N lines.")
    ] = 1000,
) -> None:
    """The sandbox's output (supervisor and agent): its last --tail lines."""
    with control(ctx) as client:
        sys.stdout.write(client.sandbox_logs(_named(name), tail))


@app.command("stop")
def stop(ctx: typer.Context, name: NameArg) -> None:
    """Stop the sandbox and its egress proxy."""
    with control(ctx) as client:
        client.stop_sandbox(_named(name))
    console.print(f"stopped {name}")


@app.command("start")
def start(ctx: typer.Context, name: NameArg) -> None:
    """Start a stopped sandbox again (refused while the kill switch holds)."""
    with control(ctx) as client:
        client.start_sandbox(_named(name))
    console.print(f"started {name}")


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: NameArg,
    keep_home: Annotated[
        bool, typer.Option("--keep-home", help="Keep the agent's home (state volume).")
    ] = False,
) -> None:
    """Remove the sandbox, its key and proxy; its policy revisions are kept for re-creation."""
    with control(ctx) as client:
        client.remove_sandbox(_named(name), keep_home=keep_home)
    console.print(f"removed {name}")


@app.command("reconcile")
def reconcile(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Match the store with Podman: restart dead proxies and sandboxes that should run.

    The control plane does this at start and every 30 s; this asks it to run once, now.
    """
    with control(ctx) as client:
        out = client.reconcile_sandboxes()
    if json_out:
        print_json(out)
        return
    for what, names in out.items():
        if names:
            console.print(f"{what.replace('_', ' ')}: {', '.join(names)}")


@policy_app.command("show")
def policy_show(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """The sandbox's current policy revision."""
    import yaml

    with control(ctx) as client:
        out = client.sandbox_policy(_named(name))
    if json_out:
        print_json({"rev": out["rev"], "policy": out["policy"]})
    else:
        text = yaml.safe_dump(out["policy"], sort_keys=False)  # as Policy.to_yaml writes it
        console.print(f"# revision {out['rev']}\n{text}", highlight=False, markup=False)


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    name: NameArg,
    policy: Annotated[Path, typer.Option("--policy", exists=True, dir_okay=False)],
) -> None:
    """Apply FILE's network rules to the running sandbox (its static part must be unchanged)."""
    text = _policy_text(policy)
    with control(ctx) as client:
        rev = client.set_sandbox_policy(_named(name), text, str(policy))
    console.print(f"{name}: policy revision {rev} applied (network rules reloaded)")


# -- approvals ---------------------------------------------------------------------------------


@approvals_app.command("list")
def approvals_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Requests to unknown hosts waiting for an operator, across all sandboxes."""
    with control(ctx) as client:
        pending = client.approvals()
    if json_out:
        print_json(pending)
        return
    for p in pending:
        asked = f"  {p['method']} {p.get('path') or ''}".rstrip() if p.get("method") else ""
        left = p.get("expires_in_s")
        expiry = f"  expires in {left:.0f}s" if isinstance(left, int | float) else ""
        console.print(
            f"{p['id']}  {p['sandbox']}  {p['host']}:{p['port']}{asked}{expiry}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line each, whatever the terminal's width
        )
    if not pending:
        console.print("no pending approvals")


@approvals_app.command("history")
def approvals_history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Decisions taken on held requests, newest first: approved, denied, expired; who, when."""
    import time

    with control(ctx) as client:
        decided = client.approval_history(limit)
    if json_out:
        print_json(decided)
        return
    for d in decided:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["decided_at"]))
        console.print(
            f"{when}  {d['id']}  {d['decision']:<8}  {d['sandbox']}  {d['host']}:{d['port']}"
            f"  by {d['actor']}",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line each, whatever the terminal's width
        )
    if not decided:
        console.print("no decisions yet")


@approvals_app.command("approve")
def approvals_approve(
    ctx: typer.Context,
    approval_id: str,
    persist: Annotated[bool, typer.Option(help="Keep it as a new policy revision.")] = False,
) -> None:
    """Let the held request through (and, with --persist, allow that host from now on).
    Already decided (by another operator): exit 10."""
    with control(ctx) as client:
        out = client.approve(approval_id, persist=persist)
    if out["rev"] is not None:
        console.print(f"approved {approval_id} ({out['sandbox']}); policy revision {out['rev']}")
    else:
        console.print(f"approved {approval_id} ({out['sandbox']}) until the proxy restarts")


@approvals_app.command("deny")
def approvals_deny(ctx: typer.Context, approval_id: str) -> None:
    """Refuse the held request (403 to the agent). Already decided: exit 10."""
    with control(ctx) as client:
        out = client.deny(approval_id)
    console.print(f"denied {approval_id} ({out['sandbox']})")


# -- kill switch ---------------------------------------------------------------------------------


def kill(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Sandboxes to stop.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every sandbox.")] = False,
    hold: Annotated[bool, typer.Option(help="Refuse to start any until `release`.")] = False,
) -> None:
    """Stop agents now (SIGTERM, SIGKILL after 3 s)."""
    if not names and not all_ and not hold:
        raise typer.BadParameter("name a sandbox or pass --all")
    with control(ctx) as client:
        out = client.kill(names=list(names or []), all_=all_, hold=hold)
    stopped = out["stopped"]
    console.print(f"stopped: {', '.join(stopped) or 'none'}" + (" · hold on" if hold else ""))


def release(ctx: typer.Context) -> None:
    """Lift the kill switch's hold: sandboxes may start again."""
    with control(ctx) as client:
        client.release()
    console.print("hold released")
