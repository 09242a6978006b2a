"""An agent's turns as the host keeps them: `<state>/agents/NAME/transcript.jsonl`, one JSON line
per turn (answered, failed, cancelled or refused). Written by the control plane only; the agent
never sees it. Its `tool_calls` are the calls as the runtime reports them: OpenClaw's are read
from a session history the agent can rewrite (blueprints/runtimes/openclaw.py)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from appliance.audit.logfile import lines_backwards
from sandbox.names import check_name


class TranscriptLog:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "agents"
        # Turns of one agent may end at once (a schedule and an operator): whole lines only.
        self._append_lock = threading.Lock()

    def path(self, name: str) -> Path:
        check_name(name, "agent")  # a path component on the host
        return self.root / name / "transcript.jsonl"

    def append(self, name: str, line: dict[str, Any]) -> None:
        path = self.path(name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(line, sort_keys=True) + "\n"
        with self._append_lock, path.open("a", encoding="utf-8") as fh:
            fh.write(data)

    def read(self, name: str) -> list[dict[str, Any]]:
        path = self.path(name)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def last(self, name: str, count: int) -> list[dict[str, Any]]:
        """The newest `count` turns, oldest first, read from the end (a console page refreshes
        this every few seconds: a long transcript is not read whole each time). A line that is
        no JSON object (cut short by a crash) is skipped, not fatal to the page."""
        path = self.path(name)
        if count <= 0 or not path.is_file():
            return []
        out: list[dict[str, Any]] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for line in lines_backwards(fd, os.fstat(fd).st_size):
                try:
                    turn = json.loads(line) if line.strip() else None
                except ValueError:  # a line cut short by a crash: not a turn
                    continue
                if isinstance(turn, dict):
                    out.append(turn)
                    if len(out) >= count:
                        break
        finally:
            os.close(fd)
        return out[::-1]
