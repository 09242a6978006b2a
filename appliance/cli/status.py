"""`appliance status`: one screen with the host, each GPU's live telemetry and the services."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from appliance.cli.context import app_context
from appliance.cli.hardware import gpu_table, host_summary
from appliance.cli.options import IntervalOpt, JsonOpt, WatchOpt
from appliance.cli.output import console, print_json
from hardware.snapshot import HostSnapshot


def _state(state: str) -> str:
    colour = {
        "ready": "green",
        "listening": "green",
        "running": "green",
        "ok": "green",
        "down": "red",
        "failed": "red",
        "missing": "red",
    }.get(state, "yellow")
    return f"[{colour}]{state}[/]"


def render(report: dict[str, Any], host: HostSnapshot) -> Group:
    app_info = report["appliance"]
    inference = report["inference"]
    gateway = report["gateway"]
    parts: list[Any] = [Text.from_markup(host_summary(host))]
    if host.gpus:
        parts.append(gpu_table(host))
    plan = inference["plan"]
    planned = (
        f"{plan['backend']} · {plan['variant']} · {plan['model']}" if plan else "none recorded"
    )
    parts.append(
        Text.from_markup(
            f"\n[bold]inference[/]  {_state(inference['state'])}{_detail(inference)}  "
            f"{inference['endpoint']}  "
            f"plan: {planned}\n"
            f"{_container_line(inference.get('container'))}"
            f"{_metrics_line(inference['metrics'])}"
            f"{_restart_line(inference.get('restarts'))}"
            f"[bold]gateway[/]    {_state(gateway['state'])}  {gateway['url']}\n"
            f"{_restart_line(gateway.get('restarts'))}"
            f"{_control_line(report.get('control'))}"
            f"[dim]state {app_info['state_dir']}"
            f"{'' if app_info['initialised'] else ' (not initialised: run `appliance up`)'}[/]"
        )
    )
    parts.extend(_budget_lines(report["budgets"]))
    parts.extend(_sandbox_lines(report.get("sandboxes") or {}))
    parts.extend(_approval_lines(report.get("approvals") or {}))
    parts.extend(_agent_lines(report.get("agents") or {}))
    return Group(*parts)


def _control_line(control: dict[str, Any] | None) -> str:
    if not control:  # a report from before the control plane
        return ""
    url = escape(control["url"])  # a socket path may hold brackets
    if url.startswith("http"):
        url = f"console {url}"  # the web console; the API below it, at api/v1
    return f"[bold]control[/]    {_state(control['state'])}  {url}\n" + _restart_line(
        control.get("restarts")
    )


def _agent_lines(section: dict[str, Any]) -> list[Text]:
    agents = section.get("agents", [])
    if not agents and not section.get("error"):
        return []
    head = f"[bold]agents[/]  {len(agents)}"
    if section.get("error"):
        head += f" · [red]{escape(section['error'])}[/]"
    lines = [Text.from_markup(head)]
    for a in agents:
        budget = f" / {a['daily_budget']}" if a.get("daily_budget") else ""
        up = f"up {a['uptime_s'] // 60} min" if a.get("uptime_s") is not None else ""
        last = (
            time.strftime("%H:%M:%S", time.localtime(a["last_activity"]))
            if a.get("last_activity")
            else "never"
        )
        lines.append(
            Text.from_markup(
                f"  {escape(a['name'])}  {escape(a['blueprint'])}  {_state(escape(a['state']))}"
                f"  {up}  turns {a['turns']} (last {last})  tokens today "
                f"{a['tokens_today']}{budget}  approvals {a.get('pending_approvals', 0)}"
            )
        )
        if a.get("schedule"):
            lines.append(Text.from_markup(_schedule_line(a["schedule"])))
    return lines


def _schedule_line(schedule: dict[str, Any]) -> str:
    """An agent's next and last scheduled run, and its last skip (the scheduler's store rows)."""

    def at(ts: float | None) -> str:
        return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "never"

    last = at(schedule.get("last_run_at"))
    if schedule.get("last_outcome"):
        last += f" {_state(escape(schedule['last_outcome']))}"
    if schedule.get("last_reason"):
        last += f" ({escape(schedule['last_reason'])})"
    line = (
        f"    [dim]schedule[/]  {schedule['entries']} entries  "
        f"next {at(schedule.get('next_run_at'))}  last {last}"
    )
    if schedule.get("last_skip_at"):
        why = escape(schedule.get("last_skip_reason") or "")
        line += f"  skipped {at(schedule['last_skip_at'])} ({why})"
    return line


def _yes_no(value: bool | None, yes: str, no: str) -> str:
    return "[dim]?[/]" if value is None else (f"[green]{yes}[/]" if value else f"[red]{no}[/]")


def _sandbox_lines(section: dict[str, Any]) -> list[Text]:
    counts = ", ".join(f"{n} {state}" for state, n in section.get("by_state", {}).items())
    head = f"[bold]sandboxes[/]  {section.get('count', 0) or 'none'}"
    if counts:
        head += f" ({escape(counts)}) · podman {escape(section.get('podman') or '?')}"
    if section.get("held"):
        head += f" · [red]kill switch held[/]: {escape(section['held'])}"
    if section.get("error"):
        head += f" · [red]{escape(section['error'])}[/]"
    lines = [Text.from_markup("\n" + head)]
    for box in section.get("sandboxes", []):
        container = box.get("container") or "not checked"
        lines.append(
            Text.from_markup(
                f"  {escape(box['name'])}  {_state(escape(box['state']))}  "
                f"container {escape(container)}  "
                f"proxy {_yes_no(box.get('proxy_alive'), 'up', 'down')}"
            )
        )
    return lines


def _approval_lines(section: dict[str, Any]) -> list[Text]:
    pending = section.get("pending", [])
    errors = section.get("errors", [])
    if not pending and not errors:
        return []
    lines = [Text.from_markup(f"[bold]approvals[/]  [yellow]{len(pending)} pending[/]")]
    for p in pending:
        lines.append(
            Text(
                f"  {p['id']}  {p['sandbox']}  {p['host']}:{p['port']}  "
                f"waiting {p['waiting_s']:.0f} s"
            )
        )
    lines.extend(Text.from_markup(f"  [red]{escape(e)}[/]") for e in errors)
    return lines


def _budget_lines(budgets: dict[str, Any]) -> list[Text]:
    lines = []
    rate = budgets.get("throughput")
    if rate and rate["requests"]:
        lines.append(
            Text(
                f"last {rate['window_s']:.0f} s: {rate['requests']} requests, "
                f"{rate['completion_tokens_per_s']:.1f} tok/s out, "
                f"{rate['prompt_tokens_per_s']:.1f} tok/s in"
            )
        )
    for key in budgets.get("keys", []):
        limits = ", ".join(
            f"{lim['budget'].replace('_', ' ')} {lim['percent']:.0f}%" for lim in key["limits"]
        )
        colour = {"ok": "green", "warning": "yellow"}.get(key["state"], "red")
        lines.append(
            Text.from_markup(
                f"key {escape(key['key'])}: [{colour}]{key['state']}[/] "
                f"· today {key['spend']['day_tokens']} tokens"
                + (f" · {escape(limits)}" if limits else " · no budget")
            )
        )
    return lines


def _detail(service: dict[str, Any]) -> str:
    detail = service.get("detail")
    return f" [dim]({escape(detail[:80])})[/]" if detail else ""


def _restart_line(restarts: list[dict[str, Any]] | None) -> str:
    """The last restart and its reason (`status --json` keeps the last few)."""
    if not restarts:
        return ""
    last = restarts[-1]
    at = time.strftime("%H:%M:%S", time.localtime(last["at"]))
    return (
        f"           [yellow]restart #{last.get('restart', len(restarts))}[/] at {at}: "
        f"{escape(str(last['reason']))}\n"
    )


def _container_line(container: dict[str, Any] | None) -> str:
    if not container:  # the venv path: the backend is a host process
        return ""
    image = escape(container.get("image") or "image unknown")
    return f"           container {escape(container.get('name') or '?')}  ({image})\n"


def _metrics_line(metrics: dict[str, Any] | None) -> str:
    """vLLM's own figures from its /metrics (None: not exported, shown as n/a, never 0)."""
    if not metrics:
        return ""
    kv = metrics["kv_cache_usage"]
    return (
        f"           requests running {_count(metrics['requests_running'])}, "
        f"waiting {_count(metrics['requests_waiting'])} · KV cache "
        f"{'n/a' if kv is None else f'{kv:.1%}'}\n"
        f"           {_rate_text(metrics.get('generation_rate'))} · tokens in/out "
        f"{_count(metrics['prompt_tokens_total'])}/{_count(metrics['generation_tokens_total'])}\n"
    )


def _count(value: float | None) -> str:
    """A gauge or counter (Prometheus floats) as a whole number; None: not exported."""
    return "n/a" if value is None else f"{value:.0f}"


def _rate_text(rate: dict[str, Any] | None) -> str:
    """`tokens/s (last 1 s) 42.0`: the counter's change, and over which window."""
    if not rate or rate.get("tokens_per_s") is None:
        why = (rate or {}).get("reason")
        return f"tokens/s n/a ({escape(why)})" if why else "tokens/s n/a"
    window = rate["window_s"]
    since = ", since the last status" if rate.get("method") == "previous_status" else ""
    return f"tokens/s (last {window:.0f} s{since}) {rate['tokens_per_s']:.1f}"


def _snapshot(ctx: typer.Context) -> tuple[dict[str, Any], HostSnapshot]:
    from appliance.ops.status import gather
    from hardware.telemetry import collect

    host = collect()
    return gather(app_context(ctx).config(), host), host


def status(
    ctx: typer.Context,
    json_out: JsonOpt = False,
    watch: WatchOpt = False,
    interval: IntervalOpt = 2.0,
) -> None:
    """Show the host, GPUs and services on one screen (`--watch` keeps it live)."""
    if not watch:
        report, host = _snapshot(ctx)
        if json_out:
            print_json(report)
        else:
            console.print(Panel(render(report, host), title="appliance status", expand=False))
        return
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                report, host = _snapshot(ctx)
                if json_out:
                    print_json(report)  # one JSON document per interval, for scripts that tail it
                else:
                    live.update(Panel(render(report, host), title="appliance status"), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
