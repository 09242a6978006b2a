"""`appliance hardware`: the GPU inventory and live telemetry, as NVML reports it."""

from __future__ import annotations

from rich.table import Table

from appliance.cli.options import JsonOpt
from appliance.cli.output import console, fmt, print_json
from hardware.snapshot import HostSnapshot


def host_summary(host: HostSnapshot) -> str:
    line = (
        f"host class [bold]{host.host_class}[/]  ·  {host.product_name or 'unknown product'}  ·  "
        f"{host.cpu_count} CPUs  ·  memory {host.memory_available_mib / 1024:.1f} / "
        f"{host.memory_total_mib / 1024:.1f} GiB available"
    )
    if host.driver_version:
        line += f"  ·  driver {host.driver_version} (CUDA {fmt(host.cuda_driver_version)})"
    elif host.nvml_error:
        line += f"  ·  no GPU: {host.nvml_error}"
    return line


def gpu_table(host: HostSnapshot) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    columns = ("#", "name", "cc", "memory used/total", "util", "temp", "power draw/limit")
    for col in (*columns, "clocks", "throttle", "notes"):
        table.add_column(col)
    for g in host.gpus:
        if g.memory_total_mib is None:
            mem = "n/a"
        else:
            mem = f"{fmt(g.memory_used_mib)}/{g.memory_total_mib} MiB"
            if g.unified_memory:  # GB10: NVML has none; telemetry reads the host's /proc/meminfo
                mem += " host memory (unified)"
        # None: the driver does not say; []: it says nothing holds the clocks back
        throttle = "n/a" if g.throttle_reasons is None else ", ".join(g.throttle_reasons) or "none"
        notes = []
        if g.ecc_enabled is not None:
            notes.append(f"ECC {'on' if g.ecc_enabled else 'off'}")
        if g.mig_enabled:
            notes.append("MIG on")
        if g.xid_events:
            notes.append("XID " + ",".join(str(e.xid) for e in g.xid_events))
        table.add_row(
            str(g.index),
            g.name,
            fmt(g.compute_capability),
            mem,
            fmt(g.utilization_gpu_pct, "%"),
            fmt(g.temperature_c, "°C"),
            f"{fmt(g.power_draw_w, 'W')}/{fmt(g.power_limit_w, 'W')}",
            f"{fmt(g.clock_sm_mhz)}/{fmt(g.clock_memory_mhz)} MHz",
            throttle,
            "; ".join(notes),
        )
    return table


def hardware(json_out: JsonOpt = False) -> None:
    """Show this host's class and every GPU's identity and live telemetry."""
    from hardware.telemetry import collect

    host = collect()
    if json_out:
        print_json(host)
        return
    console.print(host_summary(host))
    if host.gpus:
        console.print(gpu_table(host))
