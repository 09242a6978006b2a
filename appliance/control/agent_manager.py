"""Agents: a sandbox, a key and a budget made from a blueprint.

`create` takes a catalog reference or a blueprint a client sent as text, finds or builds the
image it pins by digest, renders the runtime's config into a read-only directory, creates the
sandbox with the runtime's policy and a key limited to the blueprint's models, and sets that
key's budget (the agent never gets a key: inference.local is reached through the egress proxy,
which injects it). Turns are the plane's TurnService's (turns.py). `upgrade` re-creates the
sandbox (and its key) on another version around the same home and persisted approvals, and goes
back when the new one fails. Each deployment stores its blueprint: one a client sent as text that
the catalog does not have (a file) is resolved from that copy for its turns, a failed upgrade's
return and rollback. What a runtime kind means is blueprints/runtimes' business.

The mechanics only, on one store connection (one thread): the control plane's AgentService
(agents.py) holds the locks and says who acts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import ApplianceConfig
from appliance.control.blueprints import resolve, resolve_deployed, restore_deployed
from appliance.errors import (
    OPERATOR_ERRORS,
    ApplianceError,
    ConflictError,
    NotFoundError,
    blueprint_errors,
)
from appliance.store import Store
from appliance.store.agent_store import AgentStore, Deployment, Origin
from appliance.store.inference_store import InferenceStore
from blueprints.catalog import Catalog
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.runtimes import AgentRuntime, Serving, runtime_for
from inference.ports import Budget
from sandbox.lifecycle.ports import RuntimeService
from sandbox.lifecycle.undo import Undo
from sandbox.names import check_name

if TYPE_CHECKING:
    from sandbox.lifecycle.manager import SandboxManager

Progress = Callable[[str], None]
# A catalog reference (`name[@version]`) or a blueprint parsed from a client's YAML text.
BlueprintSource = str | Blueprint


class AgentError(ApplianceError):
    hint = "see `appliance agent logs NAME` and `appliance sandbox logs NAME`"


def key_models(bp: Blueprint) -> list[str]:
    """The models an agent's key may use: the blueprint's `inference.model` and its
    `allowed_models`, as the agent names them (the gateway resolves them through its aliases)."""
    return sorted({bp.inference.model, *bp.inference.allowed_models})


def runtime_service(runtime: AgentRuntime, bp: Blueprint) -> RuntimeService:
    """What the sandbox's supervisor does with every agent's main process: restarts it when it
    exits, and stops it when the control plane stops checking in (the blueprint's
    `lifecycle.fail_closed_after`). A runtime with a service also gets its port behind the
    agent socket and a fresh token; one without (exec turns, or none) gets neither, but is kept
    up and fails closed all the same."""
    service = runtime.service()
    return RuntimeService(
        port=service.port if service is not None else None,
        token_env=service.token_env if service is not None else None,
        restart=True,
        fail_closed_after=bp.lifecycle.fail_closed_after,
    )


class AgentManager:
    """The mechanics, on one store connection (one thread); no locks of its own."""

    def __init__(
        self,
        config: ApplianceConfig,
        store: Store,
        sandboxes: SandboxManager,
        actor: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.sandboxes = sandboxes
        self.agents = AgentStore(store)
        self.catalog = Catalog(config.blueprints.dirs)
        self.actor = actor or {}  # who acts: added to every audit record

    def audit(self, event: str, **fields: Any) -> None:
        self.sandboxes.store_audit(event, **fields, **self.actor)

    # -- blueprints and images ---------------------------------------------------------------

    def blueprint(self, source: BlueprintSource) -> Blueprint:
        """A parsed blueprint as it is (checked when parsed); a reference from the catalog."""
        if isinstance(source, Blueprint):
            return source
        return resolve(self.catalog, source, compatible=True)

    def deployed(self, dep: Deployment, pinned: bool = False) -> Blueprint:
        """The blueprint a deployment runs. A client's (a file's text) from the copy stored with
        it, checked against its digest; a catalog one by name@version, as the catalog has it now
        (`pinned`: still with the digest it was deployed with, or an error)."""
        if dep.origin == "client":
            assert dep.blueprint_json is not None  # the store refuses one without it
            return restore_deployed(dep.blueprint_json, dep.digest)
        if pinned:
            return resolve_deployed(self.catalog, dep.blueprint, dep.version, dep.digest)
        return self.blueprint(dep.ref)

    def origin(self, bp: Blueprint) -> Origin:
        """`catalog` when the catalog has this very blueprint (same digest), else `client`: a
        file's text that only the deployment's stored copy can give back later."""
        try:
            same = self.catalog.get(bp.ref).digest() == bp.digest()
        except BlueprintError:  # not there, or a catalog it cannot be read from
            same = False
        return "catalog" if same else "client"

    def image(self, bp: Blueprint, progress: Progress) -> str:
        """The local image the blueprint pins (building it if this appliance knows the recipe)."""
        from appliance.packaging.images import resolve_image

        return resolve_image(self.sandboxes.podman.start(), bp.image, progress)

    def _serving(self) -> Serving:
        """What the backend serves: vLLM's planned max_model_len, or the embedded server's
        configured (RoPE-extended) context."""
        plan = (self.store.latest_plan() or {}).get("plan", {})
        if plan.get("backend") == "vllm":
            return Serving(context_tokens=int(plan["max_model_len"]), on_vllm=True)
        return Serving(context_tokens=self.config.inference.embedded_context, on_vllm=False)

    # -- create / remove ---------------------------------------------------------------------

    def create(
        self, name: str, source: BlueprintSource, progress: Progress = lambda _: None
    ) -> Deployment:
        """All or nothing: the name is checked first; a failure after the sandbox was made
        removes it (its key and budget with it)."""
        self.refuse_existing(name)
        bp = self.blueprint(source)
        return self._deploy(name, bp, "created", progress)

    def refuse_existing(self, name: str) -> None:
        """ConflictError when an agent or a sandbox has the name (after the name rule)."""
        check_name(name, "agent")
        if self.agents.current(name) is not None or self.sandboxes.boxes.get(name) is not None:
            raise ConflictError(f"{name!r} exists", hint=f"`appliance agent rm {name}` first")

    def _deploy(self, name: str, bp: Blueprint, reason: str, progress: Progress) -> Deployment:
        t0 = time.monotonic()
        image = self.image(bp, progress)
        progress(f"image: {image} ({time.monotonic() - t0:.1f} s)")
        runtime = runtime_for(bp)
        with blueprint_errors():  # a bad agent_config template: a ConfigError, nothing made
            agent_files = runtime.agent_files(self._serving())
        t1 = time.monotonic()
        kept_home = self.sandboxes.paths(name).home.exists()  # an upgrade's: never undone
        with Undo(f"agent {name}") as undo:
            # The allowlist goes in with the key (each deployment gets a fresh one, so an
            # upgrade or rollback carries its own blueprint's list): never unrestricted.
            self.sandboxes.create(
                name,
                runtime.policy(),
                runtime.command(),
                image,
                agent_files=agent_files,
                allowed_models=key_models(bp),
                service=runtime_service(runtime, bp),
            )
            undo.add(self.sandboxes.remove, name, keep_home=kept_home)
            progress(f"sandbox: running ({time.monotonic() - t1:.1f} s)")
            self._ensure_workspace(name, runtime)
            self._set_budget(name, bp)
            origin = self.origin(bp)
            dep_id = self.agents.deploy(
                name,
                bp.name,
                bp.version,
                bp.digest(),
                image,
                reason,
                origin=origin,
                blueprint_json=bp.canonical(),
            )
            undo.commit()
        self.audit(
            "agent.deploy",
            agent=name,
            blueprint=bp.ref,
            digest=bp.digest(),
            origin=origin,
            reason=reason,
        )
        return next(d for d in self.agents.history(name) if d.id == dep_id)

    def _ensure_workspace(self, name: str, runtime: AgentRuntime) -> None:
        """Create the workspace in the agent's home as the agent's (mapped) uid. The home is the
        agent's to write: never follow anything in it as root (a `workspace` symlink to /etc
        would otherwise hand /etc to the agent)."""
        home = self.sandboxes.paths(name).home
        workspace = home / Path(runtime.workspace).relative_to("/home/agent")
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
        self.current(name)
        self.sandboxes.remove(name)
        self.agents.forget(name)
        self.audit("agent.rm", agent=name)

    def stop(self, name: str) -> None:
        self.current(name)
        self.sandboxes.stop(name)
        self.audit("agent.stop", agent=name)

    def start(self, name: str) -> None:
        self.current(name)
        self.sandboxes.start(name)
        self.audit("agent.start", agent=name)

    def current(self, name: str) -> Deployment:
        dep = self.agents.current(name)
        if dep is None:
            raise NotFoundError(f"no agent named {name!r}", hint="`appliance agent list`")
        return dep

    # -- upgrade / rollback ------------------------------------------------------------------

    def upgrade_target(self, name: str, to: BlueprintSource | None = None) -> Blueprint:
        """Blueprint `to` (VERSION, NAME@VERSION or a parsed blueprint; default: the newest
        version of the blueprint the agent runs)."""
        current = self.current(name)
        if isinstance(to, str) and "@" not in to:
            to = f"{current.blueprint}@{to}"  # a bare version: of the blueprint it runs
        try:
            target = self.blueprint(to or current.blueprint)
        except NotFoundError as exc:
            if current.origin != "client":
                raise
            # Its blueprint came from a file: the catalog need not know any version of it.
            raise NotFoundError(
                f"{exc} ({name} runs {current.ref} from a file)",
                hint=f"pass the new version's file: `appliance blueprint upgrade {name} --to FILE`",
            ) from None
        if target.digest() == current.digest:
            raise AgentError(f"{name} already runs {target.ref}", hint="pass --to VERSION")
        return target

    def upgrade(
        self, name: str, to: BlueprintSource | None = None, progress: Progress = lambda _: None
    ) -> Deployment:
        """Re-create the sandbox on `upgrade_target(name, to)`, keeping its home and persisted
        approvals; back to the old one on failure."""
        current = self.current(name)
        target = self.upgrade_target(name, to)
        return self._switch(name, current, target, f"upgrade from {current.ref}", progress)

    def rollback_target(self, name: str) -> Blueprint:
        """The deployment before the current one, still the blueprint it pinned (same digest)."""
        self.current(name)
        previous = self.agents.previous(name)
        if previous is None:
            raise AgentError(f"{name} has no earlier deployment to go back to")
        return self.deployed(previous, pinned=True)

    def rollback(self, name: str, progress: Progress = lambda _: None) -> Deployment:
        current = self.current(name)
        target = self.rollback_target(name)
        return self._switch(name, current, target, f"rollback from {current.ref}", progress)

    def _switch(
        self, name: str, current: Deployment, target: Blueprint, reason: str, progress: Progress
    ) -> Deployment:
        old = self.deployed(current)
        self.sandboxes.remove(name, keep_home=True)
        try:
            return self._deploy(name, target, reason, progress)
        except OPERATOR_ERRORS as exc:  # ours and the sandbox lifecycle's
            progress(f"{target.ref} failed ({exc}); going back to {old.ref}")
            self.audit("agent.deploy_failed", agent=name, blueprint=target.ref)
            if self.sandboxes.boxes.get(name) is not None:
                self.sandboxes.remove(name, keep_home=True)
            self._deploy(name, old, f"restored after failed {reason}", progress)
            raise AgentError(
                f"{target.ref} failed to start; {name} is back on {old.ref}: {exc}"
            ) from exc

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
                running = record is not None and record.state == "running"
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
                        # A stopped sandbox's report is its last word, maybe stale: not shown.
                        "runtime": self._runtime(name) if running else None,
                    }
                )
        return rows

    def _runtime(self, name: str) -> dict[str, Any] | None:
        """The supervisor's report, read from its file (no Podman): what `agent list` shows."""
        try:
            return runtime_view(self.sandboxes.runtime_state(name))
        except (OSError, ValueError, *OPERATOR_ERRORS):  # unreadable, half written, gone
            return None


# The supervisor's runtime states (sandbox/supervisor): anything else in a report (which the
# sandbox side writes) reads as unknown, so no text of the sandbox's reaches a terminal.
RUNTIME_STATES = ("waiting", "running", "backoff", "stopped", "fail_closed", "failed")


def runtime_view(section: Any) -> dict[str, Any] | None:
    """State, restarts and the last exit's reason of a report's `runtime` section, checked."""
    if not isinstance(section, dict):
        return None
    state = section.get("state")
    restarts = section.get("restarts")
    last_exit = section.get("last_exit")
    reason = last_exit.get("reason") if isinstance(last_exit, dict) else None
    return {
        "state": state if state in RUNTIME_STATES else "unknown",
        "restarts": restarts if type(restarts) is int and restarts >= 0 else 0,
        "last_exit_reason": reason[:200] if isinstance(reason, str) else None,
    }


def deployment_view(dep: Deployment) -> dict[str, Any]:
    return {"name": dep.agent, "blueprint": dep.ref, "digest": dep.digest, "image": dep.image}
