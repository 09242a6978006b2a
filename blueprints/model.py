"""The blueprint: everything an agent is allowed, versioned, outside the agent's reach.

A blueprint names its runtime (OpenClaw at a pinned npm version, or any command), the sandbox
image pinned by digest, the inference profile, the sandbox policy (a whole one, or a `base`
policy plus `additions`), network presets, resources, budgets, the approval mode, the
agent's config template, its runtime's tool policy (`tools`), the turns the control plane runs
on a timetable (`schedule`, blueprints/schedule.py) and how long the sandbox keeps the runtime
without a control-plane check-in (`lifecycle`). `Blueprint.policy()` resolves the sandbox part
to one `sandbox` Policy, so the rules that policy enforces (no writable `/`, no root agent) hold
for blueprints too.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from blueprints.presets import PRESETS, preset_endpoints
from blueprints.schedule import ScheduleEntry, with_sessions
from sandbox.policy import (
    FORWARDER_PORT,
    Approval,
    Endpoint,
    Filesystem,
    Policy,
    Resources,
    Syscalls,
    base_policy,
    base_policy_names,
)

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_INTEGRITY = re.compile(r"^sha512-[A-Za-z0-9+/]{86}==$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key: a pre-release sorts before its release (1.0.0-rc1 < 1.0.0)."""
    m = SEMVER.match(version)
    if m is None:
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


def _semver(value: str) -> str:
    semver_key(value)
    return value


class Serve(_Strict):
    """A `command` that stays up and takes its turns over HTTP on a sandbox loopback `port`
    (the OpenResponses subset of blueprints/runtimes/responses.py, token in $AGENT_TOKEN)."""

    port: int = Field(ge=1024, le=65535)

    @field_validator("port")
    @classmethod
    def _not_the_forwarder(cls, port: int) -> int:
        if port == FORWARDER_PORT:
            raise ValueError(f"port {port} is the sandbox's egress forwarder")
        return port


class Runtime(_Strict):
    """`openclaw` at an exact npm version and integrity, or any `command` (a generic agent)."""

    kind: Literal["openclaw", "command"]
    version: str | None = None  # openclaw: the exact npm version
    integrity: str | None = None  # openclaw: the npm tarball's sha512 integrity
    command: list[str] | None = None  # command: argv run as the agent
    # command: argv run once per turn (the message and session in $AGENT_MESSAGE and
    # $AGENT_SESSION, the reply on stdout); none: the agent takes no turns.
    turn: list[str] | None = None
    serve: Serve | None = None  # command: it serves its turns itself (instead of `turn`)

    @model_validator(mode="after")
    def _complete(self) -> Runtime:
        if self.kind == "openclaw":
            if self.version is None or not re.fullmatch(r"\d{4}\.\d+\.\d+", self.version):
                raise ValueError("openclaw needs an exact version like 2026.9.6")
            if self.integrity is None or not _INTEGRITY.match(self.integrity):
                raise ValueError("openclaw needs its npm integrity (sha512-...==)")
            if self.command is not None or self.turn is not None or self.serve is not None:
                raise ValueError(
                    "`command`, `turn` and `serve` are for kind: command; openclaw's are fixed"
                )
        elif not self.command:
            raise ValueError("kind: command needs a non-empty `command` list")
        elif self.turn is not None and not self.turn:
            raise ValueError("`turn` must be a non-empty argv list (or left out)")
        elif self.turn is not None and self.serve is not None:
            raise ValueError("give `turn` or `serve`, not both (a served command takes its turns)")
        return self


class Image(_Strict):
    """The sandbox image, pinned: `digest` is the image's recipe digest or its own image digest."""

    name: str
    digest: str

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _DIGEST.match(value):
            raise ValueError(f"{value!r} is not a pinned digest (sha256:<64 hex>)")
        return value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.digest}"


class Inference(_Strict):
    model: str = "default"  # a gateway alias, resolved by inference.local
    allowed_models: list[str] = Field(default_factory=list)  # empty: only `model`
    timeout_s: float = Field(default=600.0, gt=0, le=3600)
    context_tokens: int | None = Field(default=None, ge=512)  # what the agent is told it has
    # The longest reply the agent asks for; default: 4096 on vLLM, 256 on the embedded CPU model
    # (~10 tokens/s on two cores: 2048 tokens made one OpenClaw turn take 6.5 minutes).
    max_output_tokens: int | None = Field(default=None, ge=16)


class Budgets(_Strict):
    daily_tokens: int | None = Field(default=None, ge=1)
    monthly_tokens: int | None = Field(default=None, ge=1)
    daily_cost: float | None = Field(default=None, gt=0)
    monthly_cost: float | None = Field(default=None, gt=0)


class NetworkAdditions(_Strict):
    allow: list[Endpoint] = Field(default_factory=list)
    deny: list[Endpoint] = Field(default_factory=list)


class Additions(_Strict):
    """What a blueprint adds to its base policy (lists are appended, never replaced)."""

    filesystem: Filesystem = Field(default_factory=Filesystem)
    network: NetworkAdditions = Field(default_factory=NetworkAdditions)
    syscalls: Syscalls = Field(default_factory=Syscalls)


def _tool(name: str, *, allowed: bool) -> str:
    # Imported here: blueprints.runtimes imports this module (its __init__ needs Blueprint).
    from blueprints.runtimes.tools import check_tool_name

    return check_tool_name(name, allowed=allowed)


AllowedTool = Annotated[str, AfterValidator(lambda n: _tool(n, allowed=True))]
DeniedTool = Annotated[str, AfterValidator(lambda n: _tool(n, allowed=False))]


class Tools(_Strict):
    """The runtime's tool policy: tool names or groups it knows (`read`, `group:messaging`).
    Deny wins; the tools that let an agent schedule or reconfigure itself are always denied."""

    allowed: list[AllowedTool] = Field(default_factory=list, max_length=200)  # empty: the default
    denied: list[DeniedTool] = Field(default_factory=list, max_length=200)

    @field_validator("allowed", "denied")
    @classmethod
    def _once(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _disjoint(self) -> Tools:
        from blueprints.runtimes.tools import canonical_tool  # see _tool

        allowed = {canonical_tool(n) for n in self.allowed}
        both = sorted(allowed & {canonical_tool(n) for n in self.denied})
        if both:
            raise ValueError(f"{', '.join(both)}: both allowed and denied (deny wins: drop one)")
        return self


class Lifecycle(_Strict):
    # Seconds without a control-plane check-in before the sandbox stops the agent's runtime.
    fail_closed_after: int = Field(default=120, ge=0, le=86400)

    @field_validator("fail_closed_after")
    @classmethod
    def _off_or_sane(cls, value: int) -> int:
        if 0 < value < 10:
            raise ValueError("0 (off) or at least 10 seconds")
        return value


class PolicySpec(_Strict):
    """Either a whole `policy`, or a `base` policy from sandbox/policies plus `additions`."""

    base: str | None = None
    additions: Additions = Field(default_factory=Additions)
    policy: Policy | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PolicySpec:
        if (self.base is None) == (self.policy is None):
            raise ValueError("give exactly one of `base` (with optional `additions`) or `policy`")
        if self.policy is not None and self.additions != Additions():
            raise ValueError("`additions` apply to a `base`, not to a whole `policy`")
        if self.base is not None and self.base not in (known := base_policy_names()):
            raise ValueError(f"unknown base policy {self.base!r} (known: {', '.join(known)})")
        return self


class Blueprint(_Strict):
    name: str
    version: str
    min_appliance_version: str = "0.1.0"
    description: str = ""
    runtime: Runtime
    image: Image
    inference: Inference = Field(default_factory=Inference)
    sandbox: PolicySpec
    network_presets: list[str] = Field(default_factory=lambda: ["inference-only"])
    resources: Resources | None = None  # overrides the policy's
    budgets: Budgets = Field(default_factory=Budgets)
    approval: Approval | None = None  # overrides the policy's
    agent_config: dict[str, Any] = Field(default_factory=dict)  # template, ${VAR} substituted
    tools: Tools = Field(default_factory=Tools)
    schedule: list[ScheduleEntry] = Field(default_factory=list)  # run by the control plane
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: lowercase letters, digits and '-', starting a letter")
        return value

    _versions = field_validator("version", "min_appliance_version")(_semver)

    @field_validator("network_presets")
    @classmethod
    def _presets(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise ValueError(f"unknown preset {unknown[0]!r} (known: {', '.join(sorted(PRESETS))})")
        return list(dict.fromkeys(names))

    @field_validator("tools")
    @classmethod
    def _runtime_knows(cls, tools: Tools, info: ValidationInfo) -> Tools:
        from blueprints.runtimes.tools import check_tools  # see _tool

        runtime = info.data.get("runtime")
        if runtime is not None:  # else the runtime's own error is reported
            check_tools(runtime.kind, tools)
        return tools

    @field_validator("schedule")
    @classmethod
    def _sessions(cls, entries: list[ScheduleEntry]) -> list[ScheduleEntry]:
        return with_sessions(entries)

    @model_validator(mode="after")
    def _resolves(self) -> Blueprint:
        self.policy()  # a writable `/` or a root agent in the merged policy fails here
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def policy(self) -> Policy:
        """The one sandbox policy this blueprint stands for."""
        spec = self.sandbox
        base = spec.policy if spec.policy is not None else _base(spec.base)
        add = spec.additions
        data = base.model_dump(mode="json")
        fs = data["filesystem"]
        fs["read_only"] = _union(fs["read_only"], add.filesystem.read_only)
        fs["read_write"] = _union(fs["read_write"], add.filesystem.read_write)
        data["syscalls"]["deny"] = _union(data["syscalls"]["deny"], add.syscalls.deny)
        net = data["network"]
        extra = [e.model_dump(mode="json") for e in preset_endpoints(self.network_presets)]
        extra += [e.model_dump(mode="json") for e in add.network.allow]
        net["allow"] = _union(net["allow"], extra)
        net["deny"] = _union(net["deny"], [e.model_dump(mode="json") for e in add.network.deny])
        if self.resources is not None:
            data["resources"] = self.resources.model_dump(mode="json")
        if self.approval is not None:
            net["approval"] = self.approval.model_dump(mode="json")
        return Policy.model_validate(data)

    def canonical(self) -> str:
        """The blueprint as compact JSON with sorted keys: what its digest hashes, and what a
        deployment stores (`Blueprint.model_validate_json` gives the same blueprint back)."""
        data = self.model_dump(mode="json")
        # Added later: left at their defaults, earlier deployments' digest pins still hold.
        for key in ("turn", "serve"):
            if data["runtime"][key] is None:
                del data["runtime"][key]
        for key, default in _LATER_DEFAULTS.items():
            if data[key] == default:
                del data[key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 of the canonical blueprint: what a sandbox records it runs."""
        return "sha256:" + hashlib.sha256(self.canonical().encode()).hexdigest()


_LATER_DEFAULTS: dict[str, Any] = {
    "tools": Tools().model_dump(mode="json"),
    "schedule": [],
    "lifecycle": Lifecycle().model_dump(mode="json"),
}


def _base(name: str | None) -> Policy:
    assert name is not None  # PolicySpec guarantees a known base when there is no whole policy
    return base_policy(name)


def _union(first: list[Any], more: list[Any]) -> list[Any]:
    """`first` then what `more` adds, each once, in order (dicts compared by value)."""
    seen = {json.dumps(x, sort_keys=True) for x in first}
    out = list(first)
    for item in more:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
