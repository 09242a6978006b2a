"""Agents: a sandbox, a key and a budget made from a blueprint, and the turns run in it.

`create` resolves the blueprint (catalog or file), finds or builds the image it pins by digest,
renders the agent's config into a read-only directory, creates the sandbox with the blueprint's
policy and a key limited to the blueprint's models, and sets that key's budget. A turn (`run`)
executes the runtime's one-shot command inside the sandbox through the supervisor's `exec` mode
(the agent's Landlock domain), records the reply on the host (transcript JSONL, audit) and never
hands the agent a key: inference.local is reached through the egress proxy, which injects it.
`upgrade` re-creates the sandbox (and its key) on another version around the same home and
persisted approvals, and goes back when the new one fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.blueprint_refs import check_compatible, resolve_blueprint
from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError, ConfigError, NotFoundError
from appliance.names import SANDBOX_KEY_PREFIX, check_name
from appliance.sandboxes import SandboxManager
from appliance.store import Store
from appliance.store.agent_store import AgentStore, Deployment
from appliance.store.inference_store import InferenceStore
from appliance.undo import Undo
from blueprints.catalog import Catalog
from blueprints.model import Blueprint
from inference.ports import Budget
from sandbox.compile.podman_spec import AGENT_DIR
from sandbox.policy import Policy

Progress = Callable[[str], None]
OPENCLAW_CONFIG = "openclaw.json"
# In the agent's home: writable, persistent across upgrades (the home is the state volume).
WORKSPACE = "/home/agent/workspace"
# OpenClaw headless, offline, no self-update, no discovery (REFERENCE.md §8).
OPENCLAW_ENV = {
    "OPENCLAW_OFFLINE": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_SKIP_CHANNELS": "1",
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "OPENCLAW_CONFIG_READONLY": "1",
    "DO_NOT_TRACK": "1",
    "OPENCLAW_PROXY_URL": "http://127.0.0.1:3128",
    "OPENCLAW_CONFIG_PATH": f"{AGENT_DIR}/{OPENCLAW_CONFIG}",
    "OPENCLAW_STATE_DIR": "/home/agent/.openclaw",
}
_SESSION = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class AgentError(ApplianceError):
    hint = "see `appliance agent logs NAME` and `appliance sandbox logs NAME`"


@dataclass(frozen=True)
class TurnResult:
    agent: str
    ok: bool
    reply: str
    exit_code: int
    duration_s: float
    usage: dict[str, Any]
    session: str  # the session key's last part: `agent run --session` continues it
    session_id: str | None
    raw: dict[str, Any] | None  # the runtime's own JSON record
    stderr_tail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "ok": self.ok,
            "reply": self.reply,
            "exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "usage": self.usage,
            "session": self.session,
            "session_id": self.session_id,
            "raw": self.raw,
        }


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


def key_models(bp: Blueprint) -> list[str]:
    """The models an agent's key may use: the blueprint's `inference.model` and its
    `allowed_models`, as the agent names them (the gateway resolves them through its aliases)."""
    return sorted({bp.inference.model, *bp.inference.allowed_models})


def _known(name: str, values: dict[str, Any]) -> str:
    if name not in values:
        known = ", ".join(sorted(values))
        raise ConfigError(f"agent_config: unknown placeholder {{{{{name}}}}} (known: {known})")
    return name


class AgentManager:
    def __init__(self, config: ApplianceConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.sandboxes = SandboxManager(config, store)
        self.agents = AgentStore(store)
        self.catalog = Catalog(config.blueprints.dirs)

    # -- blueprints and images ---------------------------------------------------------------

    def blueprint(self, ref: str) -> Blueprint:
        bp = resolve_blueprint(self.catalog, ref)
        check_compatible(bp)
        return bp

    def image(self, bp: Blueprint, progress: Progress) -> str:
        """The local image the blueprint pins (building it if this appliance knows the recipe)."""
        from appliance.images import resolve_image

        return resolve_image(self.sandboxes.podman.start(), bp.image, progress)

    # -- create / remove ---------------------------------------------------------------------

    def _policy(self, bp: Blueprint) -> Policy:
        policy = bp.policy()
        if bp.runtime.kind != "openclaw":
            return policy
        fs = policy.filesystem.model_copy(
            update={"read_only": [*policy.filesystem.read_only, AGENT_DIR]}
        )
        return policy.model_copy(update={"filesystem": fs})

    def _agent_files(self, bp: Blueprint) -> dict[str, str] | None:
        if bp.runtime.kind != "openclaw":
            return None
        values = {
            "model": bp.inference.model,
            "timeout_s": int(bp.inference.timeout_s),
            "context_tokens": bp.inference.context_tokens or self._served_context(),
            "max_tokens": bp.inference.max_output_tokens or (4096 if self._on_vllm() else 256),
            "workspace": WORKSPACE,
        }
        return {OPENCLAW_CONFIG: json.dumps(render(bp.agent_config, values), indent=2) + "\n"}

    def _plan(self) -> dict[str, Any]:
        return (self.store.latest_plan() or {}).get("plan", {})

    def _on_vllm(self) -> bool:
        return self._plan().get("backend") == "vllm"

    def _served_context(self) -> int:
        """The context the backend serves (what OpenClaw may fill): vLLM's planned
        max_model_len, or the embedded server's configured (RoPE-extended) context."""
        if self._on_vllm():
            return int(self._plan()["max_model_len"])
        return self.config.inference.embedded_context

    def _command(self, bp: Blueprint) -> list[str]:
        if bp.runtime.kind == "command":
            assert bp.runtime.command is not None
            return list(bp.runtime.command)
        return ["sleep", "infinity"]  # OpenClaw runs per turn (`agent --local`), no daemon

    def create(self, name: str, ref: str, progress: Progress = lambda _: None) -> Deployment:
        """All or nothing: the name is checked first; a failure after the sandbox was made
        removes it (its key and budget with it)."""
        check_name(name, "agent")
        if self.agents.current(name) is not None or self.sandboxes.boxes.get(name) is not None:
            raise AgentError(f"{name!r} exists", hint=f"`appliance agent rm {name}`")
        bp = self.blueprint(ref)
        return self._deploy(name, bp, "created", progress)

    def _deploy(self, name: str, bp: Blueprint, reason: str, progress: Progress) -> Deployment:
        t0 = time.monotonic()
        image = self.image(bp, progress)
        progress(f"image: {image} ({time.monotonic() - t0:.1f} s)")
        t1 = time.monotonic()
        kept_home = self.sandboxes.paths(name).home.exists()  # an upgrade's: never undone
        with Undo(f"agent {name}") as undo:
            # The allowlist goes in with the key (each deployment gets a fresh one, so an
            # upgrade or rollback carries its own blueprint's list): never unrestricted.
            self.sandboxes.create(
                name,
                self._policy(bp),
                self._command(bp),
                image,
                agent_files=self._agent_files(bp),
                allowed_models=key_models(bp),
            )
            undo.add(self.sandboxes.remove, name, keep_home=kept_home)
            progress(f"sandbox: running ({time.monotonic() - t1:.1f} s)")
            self._ensure_workspace(name)
            self._set_budget(name, bp)
            dep_id = self.agents.deploy(name, bp.name, bp.version, bp.digest(), image, reason)
            undo.commit()
        self.sandboxes.store_audit(
            "agent.deploy", agent=name, blueprint=bp.ref, digest=bp.digest(), reason=reason
        )
        deployment = next(d for d in self.agents.history(name) if d.id == dep_id)
        return deployment

    def _ensure_workspace(self, name: str) -> None:
        """Create the workspace in the agent's home as the agent's (mapped) uid. The home is the
        agent's to write: never follow anything in it as root (a `workspace` symlink to /etc
        would otherwise hand /etc to the agent)."""
        home = self.sandboxes.paths(name).home
        workspace = home / Path(WORKSPACE).relative_to("/home/agent")
        try:
            os.mkdir(workspace, 0o700)
        except FileExistsError:
            return  # made before (by us, or by the agent itself): its own business
        fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            owner = os.stat(home)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        finally:
            os.close(fd)

    def _set_budget(self, name: str, bp: Blueprint) -> None:
        record = self.sandboxes.boxes.get(name)
        if record is None or record.key_id is None:
            return
        b = bp.budgets
        with InferenceStore(self.config.state_dir) as inference:
            inference.set_budget(
                Budget(
                    key_id=record.key_id,
                    daily_tokens=b.daily_tokens,
                    monthly_tokens=b.monthly_tokens,
                    daily_cost=b.daily_cost,
                    monthly_cost=b.monthly_cost,
                )
            )

    def remove(self, name: str) -> None:
        self._current(name)
        self.sandboxes.remove(name)
        self.agents.forget(name)
        self.sandboxes.store_audit("agent.rm", agent=name)

    def _current(self, name: str) -> Deployment:
        dep = self.agents.current(name)
        if dep is None:
            raise NotFoundError(f"no agent named {name!r}", hint="`appliance agent list`")
        return dep

    # -- upgrade / rollback ------------------------------------------------------------------

    def upgrade(
        self, name: str, to: str | None = None, progress: Progress = lambda _: None
    ) -> Deployment:
        """Re-create the sandbox on blueprint `to` (default: the newest version of the same
        blueprint), keeping its home and persisted approvals; back to the old one on failure."""
        current = self._current(name)
        target = self.blueprint(to or current.blueprint)
        if target.digest() == current.digest:
            raise AgentError(f"{name} already runs {target.ref}", hint="pass --to VERSION")
        return self._switch(name, current, target, f"upgrade from {current.ref}", progress)

    def rollback(self, name: str, progress: Progress = lambda _: None) -> Deployment:
        current = self._current(name)
        previous = self.agents.previous(name)
        if previous is None:
            raise AgentError(f"{name} has no earlier deployment to go back to")
        target = self.blueprint(f"{previous.blueprint}@{previous.version}")
        if target.digest() != previous.digest:
            raise AgentError(
                f"{previous.ref} changed since it was deployed (digest {previous.digest[:19]}…)",
                hint="blueprint versions must not be edited in place: publish a new version",
            )
        return self._switch(name, current, target, f"rollback from {current.ref}", progress)

    def _switch(
        self, name: str, current: Deployment, target: Blueprint, reason: str, progress: Progress
    ) -> Deployment:
        old = self.blueprint(f"{current.blueprint}@{current.version}")
        self.sandboxes.remove(name, keep_home=True)
        try:
            return self._deploy(name, target, reason, progress)
        except ApplianceError as exc:
            progress(f"{target.ref} failed ({exc}); going back to {old.ref}")
            self.sandboxes.store_audit("agent.deploy_failed", agent=name, blueprint=target.ref)
            if self.sandboxes.boxes.get(name) is not None:
                self.sandboxes.remove(name, keep_home=True)
            self._deploy(name, old, f"restored after failed {reason}", progress)
            raise AgentError(
                f"{target.ref} failed to start; {name} is back on {old.ref}: {exc}"
            ) from exc

    # -- turns -------------------------------------------------------------------------------

    def run(self, name: str, message: str, session: str | None = None) -> TurnResult:
        """One turn in session `session` (default: a new one). OpenClaw keeps sessions in its
        SQLite store in the agent's home; each turn's session is exported to the host after."""
        dep = self._current(name)
        bp = self.blueprint(f"{dep.blueprint}@{dep.version}")
        if bp.runtime.kind != "openclaw":
            raise AgentError(
                f"{name} runs a plain command ({bp.ref}); it takes no turns",
                hint=f"`appliance sandbox exec {name} -- CMD`",
            )
        session = session or f"run-{secrets.token_hex(4)}"
        if not _SESSION.fullmatch(session):
            raise ConfigError(f"session {session!r}: use 1-40 of a-z, 0-9 and '-'")
        argv = [
            "openclaw", "agent", "--local", "--agent", "main",
            "--session-key", f"agent:main:{session}", "--message", message, "--json",
            "--timeout", str(int(bp.inference.timeout_s)),
        ]  # fmt: skip
        t0 = time.monotonic()
        code, out, err = self.sandboxes.exec(
            name, argv, env=self._env(), timeout_s=bp.inference.timeout_s + 120
        )
        result = _turn_result(name, session, code, out, err, time.monotonic() - t0)
        self._record_turn(name, message, result)
        self._export_session(name, session)
        return result

    def _env(self) -> dict[str, str]:
        return {**OPENCLAW_ENV, "OPENCLAW_GATEWAY_TOKEN": secrets.token_hex(16)}

    def _export_session(self, name: str, session: str) -> Path | None:
        """OpenClaw's trajectory of `session` (its events.jsonl) copied to the host. Read by the
        agent, inside the sandbox, and passed over stdout: the host never follows a path the
        agent controls."""
        out_dir = f"{WORKSPACE}/.openclaw/trajectory-exports/{session}"
        script = (
            f"openclaw sessions export-trajectory --agent main --session-key agent:main:{session} "
            f"--workspace {WORKSPACE} --output {session} --json >/dev/null "
            f"&& cat {out_dir}/events.jsonl"
        )
        code, out, _err = self.sandboxes.exec(
            name, ["sh", "-c", script], env=self._env(), timeout_s=120
        )
        if code != 0:
            self.sandboxes.store_audit("agent.export_failed", agent=name, session=session)
            return None
        path = self.transcript_path(name).parent / "sessions" / f"{session}.jsonl"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(out)
        return path

    def _record_turn(self, name: str, message: str, result: TurnResult) -> None:
        self.agents.record_turn(name)
        path = self.transcript_path(name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = {"ts": time.time(), "message": message, **result.as_dict()}
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        self._audit_key_use(name)
        self.sandboxes.store_audit(
            "agent.turn",
            agent=name,
            ok=result.ok,
            exit_code=result.exit_code,
            duration_s=round(result.duration_s, 3),
            usage=result.usage,
            session_id=result.session_id,
        )

    def _audit_key_use(self, name: str) -> None:
        """A key use summary after each turn: what the agent's key has spent today and this
        month (the ledger has every request; this is the line an auditor reads)."""
        record = self.sandboxes.boxes.get(name)
        if record is None or record.key_id is None:
            return
        with InferenceStore(self.config.state_dir) as inference:
            spend = inference.spend(record.key_id)
            inference.audit(
                "key.usage",
                key_id=record.key_id,
                key_name=SANDBOX_KEY_PREFIX + name,
                day_tokens=spend.day_tokens,
                month_tokens=spend.month_tokens,
                day_cost=spend.day_cost,
                month_cost=spend.month_cost,
            )

    def transcript_path(self, name: str) -> Path:
        return self.config.state_dir / "agents" / name / "transcript.jsonl"

    def transcript(self, name: str) -> list[dict[str, Any]]:
        path = self.transcript_path(name)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- inventory ---------------------------------------------------------------------------

    def inventory(self) -> list[dict[str, Any]]:
        rows = []
        with InferenceStore(self.config.state_dir) as inference:
            for name in self.agents.agents():
                dep = self.agents.current(name)
                assert dep is not None
                record = self.sandboxes.boxes.get(name)
                last_turn, turns = self.agents.activity(name)
                key_id = record.key_id if record else None
                spend = inference.spend(key_id) if key_id else None
                budget = inference.get_budget(key_id) if key_id else None
                rows.append(
                    {
                        "name": name,
                        "blueprint": dep.ref,
                        "digest": dep.digest,
                        "state": record.state if record else "missing",
                        "since": record.updated_at if record else None,
                        "turns": turns,
                        "last_activity": last_turn,
                        "tokens_today": spend.day_tokens if spend else 0,
                        "daily_budget": budget.daily_tokens if budget else None,
                    }
                )
        return rows


def _turn_result(
    name: str, session: str, code: int, out: bytes, err: bytes, duration: float
) -> TurnResult:
    """`openclaw agent --local --json`'s record: payloads[].text and meta.agentMeta."""
    try:
        raw = json.loads(out) if out.strip() else None
    except ValueError:
        raw = None
    raw = raw if isinstance(raw, dict) else None
    payloads = (raw or {}).get("payloads") or []
    meta = ((raw or {}).get("meta") or {}).get("agentMeta") or {}
    reply = "\n".join(str(p.get("text") or "") for p in payloads if isinstance(p, dict))
    return TurnResult(
        agent=name,
        ok=code == 0 and bool(payloads),
        reply=reply,
        exit_code=code,
        duration_s=duration,
        usage=dict(meta.get("usage") or {}),
        session=session,
        session_id=meta.get("sessionId"),
        raw=raw,
        stderr_tail=err.decode(errors="replace")[-2000:],
    )
