"""OpenClaw, headless (REFERENCE.md §8): one `openclaw agent --local` per turn, no daemon.

Its config is the blueprint's `agent_config` template rendered for the served model and mounted
read-only; sessions live in OpenClaw's SQLite store in the agent's home and are exported after
each turn as a trajectory (events.jsonl) printed on stdout.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.runtimes import WORKSPACE, Exec, Reply, Serving
from sandbox.compile.podman_spec import AGENT_DIR
from sandbox.policy import Policy

CONFIG_FILE = "openclaw.json"
# Headless, offline, no self-update, no discovery (REFERENCE.md §8).
ENV = {
    "OPENCLAW_OFFLINE": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_SKIP_CHANNELS": "1",
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "OPENCLAW_CONFIG_READONLY": "1",
    "DO_NOT_TRACK": "1",
    "OPENCLAW_PROXY_URL": "http://127.0.0.1:3128",
    "OPENCLAW_CONFIG_PATH": f"{AGENT_DIR}/{CONFIG_FILE}",
    "OPENCLAW_STATE_DIR": "/home/agent/.openclaw",
}
EXPORT_TIMEOUT_S = 120.0
TURN_GRACE_S = 120.0  # beyond the model timeout: OpenClaw's own start and shutdown
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def render(template: Any, values: dict[str, Any]) -> Any:
    """Fill `{{name}}` placeholders; a string that is only a placeholder takes the value's type
    (so `contextWindow: "{{context_tokens}}"` becomes a number). `${VAR}` is left to the agent."""
    if isinstance(template, dict):
        return {k: render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return values[_known(whole.group(1), values)]
    return _PLACEHOLDER.sub(lambda m: str(values[_known(m.group(1), values)]), template)


def _known(name: str, values: dict[str, Any]) -> str:
    if name not in values:
        known = ", ".join(sorted(values))
        raise BlueprintError(f"agent_config: unknown placeholder {{{{{name}}}}} (known: {known})")
    return name


def _session_key(session: str) -> str:
    return f"agent:main:{session}"


class OpenClawRuntime:
    workspace = WORKSPACE

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def policy(self) -> Policy:
        """The blueprint's policy with the config directory read-only to the agent."""
        policy = self.blueprint.policy()
        fs = policy.filesystem.model_copy(
            update={"read_only": [*policy.filesystem.read_only, AGENT_DIR]}
        )
        return policy.model_copy(update={"filesystem": fs})

    def command(self) -> list[str]:
        return ["sleep", "infinity"]  # OpenClaw runs per turn (`agent --local`), no daemon

    def agent_files(self, serving: Serving) -> dict[str, str]:
        inference = self.blueprint.inference
        values = {
            "model": inference.model,
            "timeout_s": int(inference.timeout_s),
            "context_tokens": inference.context_tokens or serving.context_tokens,
            "max_tokens": inference.max_output_tokens or (4096 if serving.on_vllm else 256),
            "workspace": WORKSPACE,
        }
        config = render(self.blueprint.agent_config, values)
        return {CONFIG_FILE: json.dumps(config, indent=2) + "\n"}

    def turn(self, message: str, session: str) -> Exec:
        timeout_s = self.blueprint.inference.timeout_s
        argv = [
            "openclaw", "agent", "--local", "--agent", "main",
            "--session-key", _session_key(session), "--message", message, "--json",
            "--timeout", str(int(timeout_s)),
        ]  # fmt: skip
        return Exec(argv, _env(), timeout_s + TURN_GRACE_S)

    def read_turn(self, exit_code: int, stdout: bytes, stderr: bytes) -> Reply:
        """`openclaw agent --local --json`'s record: payloads[].text and meta.agentMeta."""
        try:
            raw = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            raw = None
        raw = raw if isinstance(raw, dict) else None
        payloads = (raw or {}).get("payloads") or []
        meta = ((raw or {}).get("meta") or {}).get("agentMeta") or {}
        text = "\n".join(str(p.get("text") or "") for p in payloads if isinstance(p, dict))
        return Reply(
            ok=exit_code == 0 and bool(payloads),  # exit 0 without a reply is not a turn
            text=text,
            usage=dict(meta.get("usage") or {}),
            session_id=meta.get("sessionId"),
            raw=raw,
        )

    def export_session(self, session: str) -> Exec:
        """The session's trajectory, read by the agent inside the sandbox and printed: the host
        never follows a path the agent controls."""
        out_dir = f"{WORKSPACE}/.openclaw/trajectory-exports/{session}"
        script = (
            f"openclaw sessions export-trajectory --agent main --session-key "
            f"{_session_key(session)} --workspace {WORKSPACE} --output {session} --json "
            f">/dev/null && cat {out_dir}/events.jsonl"
        )
        return Exec(["sh", "-c", script], _env(), EXPORT_TIMEOUT_S)


def _env() -> dict[str, str]:
    # A fresh gateway token per command: nothing listens on it (no daemon), the config wants one.
    return {**ENV, "OPENCLAW_GATEWAY_TOKEN": secrets.token_hex(16)}
