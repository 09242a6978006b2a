"""`appliance sandbox`, `approvals`, `kill`/`release`: agents' sandboxes on Podman."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json

app = typer.Typer(help="Create and manage agent sandboxes (rootless Podman).", no_args_is_help=True)
policy_app = typer.Typer(help="Show or change a sandbox's policy.", no_args_is_help=True)
approvals_app = typer.Typer(help="Pending egress approvals.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

NameArg = Annotated[str, typer.Argument(help="Sandbox name.", metavar="NAME")]


@contextmanager
def manager(ctx: typer.Context):
    from appliance.sandboxes import SandboxManager, ensure_ready
    from appliance.store import open_store

    config = app_context(ctx).config()
    ensure_ready(config)
    with open_store(config.state_dir) as store:
        yield SandboxManager(config, store)


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
    from appliance.names import check_name
    from appliance.sandboxes import read_policy_file

    check_name(name, "sandbox")  # before anything is read, opened or written
    parsed = read_policy_file(policy)  # a bad file fails here: nothing is started
    with manager(ctx) as m:
        record = m.create(name, parsed, command or None, image)
        report = m.enforcement(name)
    if json_out:
        print_json({"name": record.name, "state": record.state, "enforcement": report})
    else:
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
    with manager(ctx) as m:
        rows = m.list()
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
    domain apply, as to the agent itself. Stdin is forwarded (like `podman exec -i`) and the
    exit status is the command's."""
    from appliance.sandbox_exec import exec_attached

    with manager(ctx) as m:
        code = exec_attached(m, name, command)
    raise typer.Exit(code)


@app.command("logs")
def logs(ctx: typer.Context, name: NameArg) -> None:
    """The sandbox's output (supervisor and agent)."""
    with manager(ctx) as m:
        out = b"".join(m.container(name).logs(stdout=True, stderr=True))
    sys.stdout.write(out.decode(errors="replace"))


@app.command("stop")
def stop(ctx: typer.Context, name: NameArg) -> None:
    """Stop the sandbox and its egress proxy."""
    with manager(ctx) as m:
        m.stop(name)
    console.print(f"stopped {name}")


@app.command("start")
def start(ctx: typer.Context, name: NameArg) -> None:
    """Start a stopped sandbox again (refused while the kill switch holds)."""
    with manager(ctx) as m:
        m.start(name)
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
    with manager(ctx) as m:
        m.remove(name, keep_home=keep_home)
    console.print(f"removed {name}")


@app.command("reconcile")
def reconcile(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Match the store with Podman: restart dead proxies and sandboxes that should run.

    `appliance serve all` does this at start and every 30 s; this runs it once, now.
    """
    with manager(ctx) as m:
        out = m.reconcile().as_dict()
    if json_out:
        print_json(out)
        return
    for what, names in out.items():
        if names:
            console.print(f"{what.replace('_', ' ')}: {', '.join(names)}")


@policy_app.command("show")
def policy_show(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """The sandbox's current policy revision."""
    with manager(ctx) as m:
        rev, policy = m.policy(name)
    if json_out:
        print_json({"rev": rev, "policy": policy})
    else:
        console.print(f"# revision {rev}\n{policy.to_yaml()}", highlight=False, markup=False)


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    name: NameArg,
    policy: Annotated[Path, typer.Option("--policy", exists=True, dir_okay=False)],
) -> None:
    """Apply FILE's network rules to the running sandbox (its static part must be unchanged)."""
    from appliance.sandboxes import read_policy_file

    parsed = read_policy_file(policy)
    with manager(ctx) as m:
        rev = m.set_policy(name, parsed)
    console.print(f"{name}: policy revision {rev} applied (network rules reloaded)")


# -- approvals ---------------------------------------------------------------------------------


def _admin_clients(m: Any) -> dict[str, Any]:
    from sandbox.proxy import AdminClient

    return {
        r.name: AdminClient(m.paths(r.name).admin_socket)
        for r in m.boxes.list()
        if m.paths(r.name).admin_socket.exists()
    }


@approvals_app.command("list")
def approvals_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Requests to unknown hosts waiting for an operator, across all sandboxes."""
    with manager(ctx) as m:
        pending = [p for client in _admin_clients(m).values() for p in client.list()]
    if json_out:
        print_json(pending)
        return
    for p in pending:
        console.print(f"{p['id']}  {p['sandbox']}  {p['host']}:{p['port']}")
    if not pending:
        console.print("no pending approvals")


def _decide(ctx: typer.Context, approval_id: str, approve: bool, persist: bool) -> None:
    from appliance.errors import NotFoundError

    with manager(ctx) as m:
        for name, client in _admin_clients(m).items():
            shown = [p for p in client.list() if p["id"] == approval_id]
            if shown:
                if not approve:
                    client.deny(approval_id)
                    console.print(f"denied {approval_id} ({name})")
                    return
                if persist:  # the control plane writes it, on this command: never the proxy
                    endpoint = m.persistable(approval_id, shown[0]["host"], shown[0]["port"])
                    client.approve(approval_id)
                    rev = m.persist_approval(name, endpoint, approval_id)
                    console.print(f"approved {approval_id} ({name}); policy revision {rev}")
                else:
                    client.approve(approval_id)
                    console.print(f"approved {approval_id} ({name}) until the proxy restarts")
                return
    raise NotFoundError(f"no pending approval {approval_id!r}", hint="`appliance approvals list`")


@approvals_app.command("approve")
def approvals_approve(
    ctx: typer.Context,
    approval_id: str,
    persist: Annotated[bool, typer.Option(help="Keep it as a new policy revision.")] = False,
) -> None:
    """Let the held request through (and, with --persist, allow that host from now on)."""
    _decide(ctx, approval_id, True, persist)


@approvals_app.command("deny")
def approvals_deny(ctx: typer.Context, approval_id: str) -> None:
    """Refuse the held request (403 to the agent)."""
    _decide(ctx, approval_id, False, False)


# -- kill switch ---------------------------------------------------------------------------------


def kill(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Sandboxes to stop.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every sandbox.")] = False,
    hold: Annotated[bool, typer.Option(help="Refuse to start any until `release`.")] = False,
) -> None:
    """Stop agents now (SIGTERM, SIGKILL after 3 s)."""
    with manager(ctx) as m:
        targets = [r.name for r in m.boxes.list()] if all_ else list(names or [])
        if not targets and not hold:
            raise typer.BadParameter("name a sandbox or pass --all")
        stopped = m.kill(targets, hold, reason="operator kill switch")
    console.print(f"stopped: {', '.join(stopped) or 'none'}" + (" · hold on" if hold else ""))


def release(ctx: typer.Context) -> None:
    """Lift the kill switch's hold: sandboxes may start again."""
    with manager(ctx) as m:
        m.boxes.release()
        m.store_audit("release")
    console.print("hold released")
