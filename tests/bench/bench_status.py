"""Benchmark: how long `appliance status --json` takes on this host, side by side with baselines.

Runs each command N times, interleaved (so machine noise hits all alike), and prints medians and
ratios. Not a test: run it by hand, `.venv/bin/python tests/bench/bench_status.py [N]`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import appliance.cli.main": [sys.executable, "-c", "import appliance.cli.main"],
    "appliance --version": [str(BIN / "appliance"), "--version"],
    "appliance hardware --json": [str(BIN / "appliance"), "hardware", "--json"],
    "appliance status --json": [str(BIN / "appliance"), "status", "--json"],
    "appliance status": [str(BIN / "appliance"), "status"],
}


def main(n: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(n):
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':32} {'median ms':>10} {'max ms':>8} {'x python':>9}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:32} {med * 1000:10.0f} {max(samples) * 1000:8.0f} {med / base:9.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
