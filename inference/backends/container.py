"""The backend inside the appliance image: the `podman run` that wraps a backend's argv.

The control plane and the gateway stay host processes; only the backend (`vllm serve ...` or
the embedded model server) runs in the image, exactly as the host would have exec'd it. The
container shares the host's network (rootless port publishing needs /dev/net/tun, which is not
always usable), so the backend binds its configured loopback address as on the host. Env values
reach the container as `--env=NAME` only: podman copies the value from its own environment, so
nothing secret is in argv (/proc/<pid>/cmdline is world-readable).

Who runs podman is the caller's choice (`PodmanAccount`): the service user's rootless Podman
when the supervisor runs as root (the store `appliance image build` builds into), the invoking
user's own otherwise. This module only describes the command; ProcessBackend runs it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE_MOUNT = "/var/lib/appliance"  # the image's state dir: writable, on a named volume
MODELS_MOUNT = "/models"  # the host's models directory, read-only (GPU targets)
HF_HOME = f"{MODELS_MOUNT}/hf"  # the Hugging Face cache layout under the models directory
GPU_DEVICE = "nvidia.com/gpu=all"  # CDI: every GPU of the host's spec
# vLLM (PyTorch workers, NCCL) shares tensors through /dev/shm; Podman's default is 64 MB.
GPU_SHM_SIZE = "16g"
RUNTIME = "runc"  # crun refuses the hybrid cgroup layout on these hosts

# An image reference: registry/name[:tag][@digest]; no whitespace, no leading '-'.
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # Podman's container/volume name rule
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def _check_path(what: str, value: str) -> str:
    """A value that becomes (part of) one argv word: no whitespace or control characters (a
    newline in a log line or a mount spec), no leading '-' (it would read as a flag)."""
    if not value or _UNSAFE.search(value) or value.startswith("-"):
        raise ValueError(f"{what} {value!r}: no whitespace, control characters or leading '-'")
    return value


def instance_suffix(state_dir: str | Path) -> str:
    """8 hex of sha256(state_dir): one backend container (and cache volume) per appliance."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


def container_name(state_dir: str | Path) -> str:
    return f"appliance-backend-{instance_suffix(state_dir)}"


def cache_volume_name(state_dir: str | Path) -> str:
    return f"appliance-backend-cache-{instance_suffix(state_dir)}"


@dataclass(frozen=True)
class PodmanAccount:
    """Who runs podman. `uid`/`gid` None: this process's own user. `env`: podman's whole
    environment (HOME, XDG_RUNTIME_DIR of that user's rootless Podman); None: inherit ours."""

    uid: int | None = None
    gid: int | None = None
    env: Mapping[str, str] | None = None
    home: str | None = None  # podman's working directory

    def argv(self, *args: str, podman: str = "podman") -> list[str]:
        """A podman command line as this account runs it (its global flags first)."""
        return [podman, "--runtime", RUNTIME, *args]

    def popen_kwargs(self, current_uid: int) -> dict[str, object]:
        """subprocess.Popen arguments that drop to this account (and all groups but its own)."""
        if self.uid is None or self.uid == current_uid:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class ContainerSpec:
    """`podman run` of the appliance image around an inner argv (see the module docstring)."""

    image: str
    name: str
    cache_volume: str
    gpu: bool = False
    # Mounted read-only at /models when given (GPU targets need it: the weights)
    models_dir: Path | None = None
    podman: str = "podman"
    account: PodmanAccount = field(default_factory=PodmanAccount)

    def __post_init__(self) -> None:
        if not _IMAGE.match(self.image) or _UNSAFE.search(self.image):
            raise ValueError(f"image {self.image!r} is not an image reference")
        for what, value in (("container name", self.name), ("volume", self.cache_volume)):
            if not _NAME.match(value):
                raise ValueError(f"{what} {value!r}: letters, digits, '_', '.', '-' only")
        _check_path("podman executable", self.podman)
        if self.gpu and self.models_dir is None:
            raise ValueError("a GPU container needs the models directory (weights)")
        if self.models_dir is not None:
            path = _check_path("models directory", str(self.models_dir))
            if ":" in path or not Path(path).is_absolute():
                raise ValueError(f"models directory {path!r}: an absolute path without ':'")

    def podman_argv(self, *args: str) -> list[str]:
        """A podman command line for this spec's executable and account."""
        return self.account.argv(*args, podman=self.podman)

    @property
    def hf_home(self) -> str:
        """HF_HOME inside the container (the host's <models_dir>/hf)."""
        return HF_HOME

    def run_argv(self, inner: Sequence[str], env_names: Iterable[str] = ()) -> list[str]:
        """The `podman run` that runs `inner` in the image, in the foreground; each of
        `env_names` is copied from podman's own environment (the values never reach argv)."""
        inner = list(inner)
        if not inner:
            raise ValueError("empty inner argv")
        _check_path("entrypoint", inner[0])
        for word in inner[1:]:
            if "\n" in word or "\x00" in word:
                raise ValueError(f"argument {word!r}: no newline or NUL")
        names = sorted(set(env_names))
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        argv = self.podman_argv(
            "run",
            "--rm", "--replace", f"--name={self.name}",
            "--pull=never",
            "--network=host",  # the backend binds its loopback address/port as on the host
            # podman copies the host's proxy variables into the container otherwise
            "--http-proxy=false",
            "--no-healthcheck",  # the image's HEALTHCHECK probes the gateway: not in here
            "--cap-drop=all", "--security-opt=no-new-privileges", "--read-only",
            f"--volume={self.cache_volume}:{CACHE_MOUNT}",
        )  # fmt: skip
        if self.gpu:
            argv += [f"--device={GPU_DEVICE}", f"--shm-size={GPU_SHM_SIZE}"]
        if self.models_dir is not None:
            argv.append(f"--volume={self.models_dir}:{MODELS_MOUNT}:ro")
        argv += [f"--env={name}" for name in names]
        return [*argv, f"--entrypoint={inner[0]}", self.image, *inner[1:]]

    def stop_argv(self, grace: float) -> list[str]:
        """`podman stop`: SIGTERM in the container, SIGKILL after `grace` s (signals to the
        foreground `podman run` do not reliably reach the container)."""
        return self.podman_argv("stop", "-t", str(max(0, round(grace))), self.name)

    def remove_argv(self) -> list[str]:
        """Removes what a killed `podman run --rm` left behind (nothing if it is gone), at once:
        it is stopped already, or a leftover of a supervisor that was killed. Idempotent."""
        return self.podman_argv("rm", "--force", "--time=0", "--ignore", self.name)

    def process_env(self, base: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
        """podman's environment: the account's (or `base`) plus the inner env's values."""
        env = dict(base if self.account.env is None else self.account.env)
        return {**env, **values}


def _allows(st: os.stat_result, uid: int, gids: set[int], bits: int) -> bool:
    """Whether the owner/group/other class `uid` falls in has every one of `bits` (r=4, x=1)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def models_dir_readable(models_dir: Path, account: PodmanAccount) -> str | None:
    """Why the backend's Podman `account` cannot mount `models_dir` read-only and the image's
    own uid (a subuid: "other" to the host) cannot read it, or None when both can. Read-only:
    stat() only, nothing is run or made."""
    uid = os.geteuid() if account.uid is None else account.uid
    try:
        entry = pwd.getpwuid(uid)
        gids = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
        who = entry.pw_name
    except KeyError:
        gids, who = ({account.gid} if account.gid is not None else set()), f"uid {uid}"
    if account.gid is not None:
        gids.add(account.gid)
    path = Path(os.path.abspath(models_dir))
    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not _allows(st, uid, gids, 1):
            mode = stat.filemode(st.st_mode)
            return f"{who} cannot enter {parent} (mode {mode}) on the way to {path}"
    try:
        st = path.stat()
    except OSError as exc:
        return f"models directory {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"models directory {path} is not a directory"
    if not _allows(st, uid, gids, 5):
        return f"{who} cannot read {path} (mode {stat.filemode(st.st_mode)})"
    if st.st_mode & 0o005 != 0o005:
        return f"the appliance image's user cannot read {path} (mode {stat.filemode(st.st_mode)})"
    return None
