"""The sandbox policy: what an agent may touch, set outside the agent and enforced by the kernel.

Static part (fixed when the sandbox is created): filesystem, Landlock compatibility, process
identity, resources, extra syscall denies. Dynamic part (hot-reloaded): network rules and the
approval mode. YAML in and out; errors name `file:line`.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from sandbox.yamlfile import YamlError, load_yaml, parse_yaml, validation_message

_HOST = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SYSCALL = re.compile(r"^[a-z_][a-z0-9_]*$")

# HTTP methods each OpenShell-style access level allows (plain HTTP only; CONNECT is opaque).
ACCESS_METHODS: dict[str, frozenset[str]] = {
    "read-only": frozenset({"GET", "HEAD", "OPTIONS"}),
    "read-write": frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH"}),
    "full": frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(path: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{path!r} must be an absolute path without '..'")
    return str(p)


class Filesystem(_Strict):
    read_only: list[str] = Field(default_factory=list)
    read_write: list[str] = Field(default_factory=list)

    @field_validator("read_only", "read_write")
    @classmethod
    def _paths(cls, paths: list[str]) -> list[str]:
        return [_absolute(p) for p in paths]

    @field_validator("read_write")
    @classmethod
    def _root_never_writable(cls, paths: list[str]) -> list[str]:
        if "/" in paths:
            raise ValueError("'/' is never writable")
        return paths


class Landlock(_Strict):
    compatibility: Literal["hard_requirement", "best_effort"] = "hard_requirement"


FORWARDER_PORT = 3128  # the supervisor's loopback forwarder to the egress socket: never the agent's
MAX_LISTEN = 16


class Process(_Strict):
    uid: int = Field(default=1000, ge=1, le=65534)  # never 0: the agent never runs as root
    gid: int = Field(default=1000, ge=1, le=65534)
    # Loopback TCP ports the agent's runtime may listen on (Landlock bind_tcp; its own tools and
    # the supervisor's agent-socket forwarder may connect to them). Strict ints: no `true` or "80".
    listen: list[StrictInt] = Field(default_factory=list, max_length=MAX_LISTEN)

    @field_validator("listen")
    @classmethod
    def _listen_ports(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 1024 <= port <= 65535:
                raise ValueError(f"listen port {port} is not in 1024..65535")
            if port == FORWARDER_PORT:
                raise ValueError(f"listen port {port} is the egress forwarder's")
        if len(set(ports)) != len(ports):
            raise ValueError(f"listen ports repeat: {ports}")
        return sorted(ports)

    @model_serializer(mode="wrap")
    def _omit_empty_listen(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent when empty: policies without it keep their YAML, digests and golden files.
        data = handler(self)
        if not self.listen:
            data.pop("listen", None)
        return data


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size like 512m or 2g")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class Resources(_Strict):
    memory: int = Field(default=2 * 1024**3, ge=64 * 1024**2)  # bytes; YAML takes 2g, 512m
    pids: int = Field(default=256, ge=16, le=4096)
    cpus: float = Field(default=1.0, gt=0, le=256)
    # Per-process cap on private writable memory (RLIMIT_DATA), the only memory cap where
    # rootless Podman cannot set cgroup limits. Default: `memory`. Node needs more: each worker
    # reserves a code range that counts here (OpenClaw peaks at ~4.7 GB of it, 0.9 GB resident).
    process_memory: int | None = Field(default=None, ge=64 * 1024**2)

    @field_validator("memory", "process_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @property
    def data_limit(self) -> int:
        return self.process_memory or self.memory


class Syscalls(_Strict):
    deny: list[str] = Field(default_factory=list)  # extra denies on top of the built-in profile

    @field_validator("deny")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _SYSCALL.match(name):
                raise ValueError(f"{name!r} is not a syscall name")
        return sorted(set(names))


class Endpoint(_Strict):
    """One network rule; `host` allows a wildcard only as the whole first label (`*.a.com`).

    `paths` globs judge plain-HTTP requests on their normalised path (sandbox/proxy/paths.py:
    unreserved escapes decoded, dot segments and `//` removed; ambiguous paths refused), which
    is also what the proxy forwards. In `allow` they compare case-sensitively; in `deny`,
    ASCII-case-insensitively (servers that fold case must not serve a denied path)."""

    host: str
    ports: list[int] = Field(default_factory=lambda: [443])
    access: Literal["read-only", "read-write", "full"] = "full"  # plain HTTP methods
    paths: list[str] = Field(default_factory=lambda: ["/**"])  # plain HTTP path globs
    allow_private: bool = False  # may resolve to a private/loopback/link-local address

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        host = host.lower().rstrip(".")
        if not _HOST.match(host):
            raise ValueError(f"{host!r}: a host name, with '*.' allowed only as the first label")
        return host

    @field_validator("ports")
    @classmethod
    def _ports(cls, ports: list[int]) -> list[int]:
        if not ports or any(not 1 <= p <= 65535 for p in ports):
            raise ValueError("ports must be 1..65535, at least one")
        return sorted(set(ports))

    def matches_host(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if port not in self.ports:
            return False
        if self.host.startswith("*."):
            suffix = self.host[1:]  # ".example.com": one or more labels before it
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host

    def allows_request(self, method: str, path: str) -> bool:
        if method.upper() not in ACCESS_METHODS[self.access]:
            return False
        path = path.split("?", 1)[0] or "/"
        return any(_path_match(path, glob) for glob in self.paths)


def _path_match(path: str, glob: str) -> bool:
    """`**` spans segments, `*` stays within one."""
    regex = re.escape(glob).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace("\0", ".*")
    return re.fullmatch(regex, path) is not None


class Approval(_Strict):
    mode: Literal["hold", "deny"] = "hold"  # hold: unknown hosts wait for an operator
    hold_seconds: float = Field(default=30.0, ge=0, le=3600)


class Network(_Strict):
    """The dynamic part: reloaded into the running proxy without restarting the sandbox."""

    allow: list[Endpoint] = Field(default_factory=list)
    deny: list[Endpoint] = Field(default_factory=list)  # explicit deny wins over allow
    approval: Approval = Field(default_factory=Approval)


class Policy(_Strict):
    version: Literal[1] = 1
    filesystem: Filesystem = Field(default_factory=Filesystem)
    landlock: Landlock = Field(default_factory=Landlock)
    process: Process = Field(default_factory=Process)
    resources: Resources = Field(default_factory=Resources)
    syscalls: Syscalls = Field(default_factory=Syscalls)
    network: Network = Field(default_factory=Network)

    @model_validator(mode="after")
    def _disjoint(self) -> Policy:
        both = set(self.filesystem.read_only) & set(self.filesystem.read_write)
        if both:
            raise ValueError(f"paths both read_only and read_write: {sorted(both)}")
        return self

    def static_part(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"network"})

    def with_network(self, network: Network) -> Policy:
        return self.model_copy(update={"network": network})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_policy(text: str, source: str) -> Policy:
    data, provenance = parse_yaml(text, source)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise YamlError(validation_message(exc, provenance, source)) from None


def load_policy(path: Path) -> Policy:
    data, provenance = load_yaml(path)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise YamlError(validation_message(exc, provenance, str(path))) from None


# The policies this package ships (sandbox/policies/NAME.yaml), reached by name only: a blueprint
# may start from one, and a name never becomes a path outside this directory.
BASE_POLICIES = Path(__file__).resolve().parent / "policies"


def base_policy_names() -> list[str]:
    return sorted(p.stem for p in BASE_POLICIES.glob("*.yaml"))


def base_policy(name: str) -> Policy:
    """The shipped policy `name`; KeyError for any name that is not one of them."""
    if name not in base_policy_names():
        raise KeyError(name)
    return load_policy(BASE_POLICIES / f"{name}.yaml")
