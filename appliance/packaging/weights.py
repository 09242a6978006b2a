"""Model weights on disk: are they there, how much room they need, and fetching them.

Weights live where vLLM reads them with HF_HOME=<models_dir>/hf: the Hugging Face cache layout
under <models_dir>/hf/hub (models--ORG--NAME/{refs,blobs,snapshots}). A download records every
file's sha256 and size, and the commit, in <models_dir>/hf/checksums/models--ORG--NAME.json;
an interrupted download records nothing, so it never counts as present. Directories are 0755 and
files 0644: the appliance image's uid 10001 (mapped into the service user's subuid range) reads
them through a read-only bind mount.

`download` resumes: huggingface_hub resumes a cut transfer within the call (a Range request),
and a second call after a failed one fetches only the files that did not finish (a file cut
short is fetched again from its start: the library keeps no partial file across calls).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import NotFoundError, PreflightError
from appliance.packaging.hub_errors import (
    OFFLINE_HINT,
    TOKEN_FILE,
    HubUnreachableError,
    WeightsCorruptError,
    hub_errors,
)
from hardware.catalog import variant_by_id
from hardware.plan_types import ServingPlan

log = logging.getLogger(__name__)
GIB = 1024**3
# Room beyond the weights themselves: the hub's lock and tree files, and other writers.
HEADROOM_BYTES = GIB // 2
HEADROOM_RATIO = 0.02
# What vLLM loads: weights, configs, tokenizers (json, sentencepiece, tiktoken, vocab/merges
# txt), chat templates, and the code a trust-remote-code model imports. Not *.bin/*.pth copies,
# GGUF or ONNX exports: they would double the download.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.py",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
]
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_CHUNK = 8 * 1024 * 1024


# ---------------------------------------------------------------------------- where


@dataclass(frozen=True)
class WeightsStatus:
    present: bool
    path: Path | None  # what vLLM is given: the snapshot directory or the local directory
    detail: str  # one line for the operator


def is_hub_id(model: str) -> bool:
    """ORG/NAME as the Hub spells ids; anything else (a path, `../x`) is a local directory."""
    return bool(_HF_ID.fullmatch(model)) and ".." not in model and not Path(model).is_dir()


def hub_cache(models_dir: Path) -> Path:
    return models_dir / "hf" / "hub"


def repo_folder(model: str) -> str:
    return "models--" + model.replace("/", "--")


def checksums_path(models_dir: Path, model: str) -> Path:
    return models_dir / "hf" / "checksums" / f"{repo_folder(model)}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _ref_commit(repo_dir: Path) -> str | None:
    try:
        return (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _missing(snapshot: Path, sizes: dict[str, int]) -> list[str]:
    """The files not there with their expected size (a link into blobs/ is followed)."""
    missing = []
    for name, size in sizes.items():
        try:
            if (snapshot / name).stat().st_size != size:
                missing.append(name)
        except OSError:
            missing.append(name)
    return missing


def _hub_listing(cache: Path, model: str, commit: str) -> dict[str, int] | None:
    """The file sizes of the hub's own cached tree listing (a download or a bundle wrote it),
    limited to the files we fetch."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    try:
        tree = get_cached_repo_tree(model, revision=commit, cache_dir=cache)
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    sizes = {f.path: f.size for f in tree}
    return {name: sizes[name] for name in filter_repo_objects(sizes, allow_patterns=ALLOW_PATTERNS)}


def weights_status(models_dir: Path, model: str) -> WeightsStatus:
    """Whether `model` (a Hub id or a local directory) is complete on disk."""
    if not is_hub_id(model):
        return _local_status(Path(model).expanduser())
    cache = hub_cache(models_dir)
    repo_dir = cache / repo_folder(model)
    commit = _ref_commit(repo_dir)
    if commit is None:
        return WeightsStatus(False, None, f"{model} is not downloaded (nothing in {cache})")
    snapshot = repo_dir / "snapshots" / commit
    record = _read_json(checksums_path(models_dir, model))
    if isinstance(record, dict) and record.get("commit") == commit:
        sizes = {name: int(row["size"]) for name, row in record["files"].items()}
        checked = "checksums recorded"
    else:
        listed = _hub_listing(cache, model, commit)
        if listed is None:
            why = "no file listing or checksums recorded: run the download again"
            return WeightsStatus(False, None, f"{model} is incomplete in {cache} ({why})")
        sizes, checked = listed, "no checksums recorded"
    missing = _missing(snapshot, sizes)
    if missing or not sizes:
        got = len(sizes) - len(missing)
        example = f", e.g. {missing[0]}" if missing else ""
        detail = (
            f"{model} is incomplete: {got} of {len(sizes)} files{example} (commit {commit[:12]})"
        )
        return WeightsStatus(False, None, detail)
    total = sum(sizes.values()) / GIB
    detail = f"{model}: {len(sizes)} files, {total:.2f} GiB, commit {commit[:12]} ({checked})"
    return WeightsStatus(True, snapshot, detail)


def _local_status(path: Path) -> WeightsStatus:
    if not path.is_dir():
        return WeightsStatus(False, None, f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        return WeightsStatus(False, None, f"model directory {path} has no config.json")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    if not weights:
        return WeightsStatus(False, None, f"model directory {path} has no weight files")
    size = sum(p.stat().st_size for p in weights) / GIB
    return WeightsStatus(
        True, path, f"local directory {path}: {len(weights)} weight files, {size:.2f} GiB"
    )


# ---------------------------------------------------------------------------- room


def required_bytes(plan: ServingPlan) -> int | None:
    """The planned checkpoint's size on disk (models.yaml), or None when the plan serves
    something the table does not describe (an operator's Hub id or directory)."""
    variant = variant_by_id(plan.variant)
    if variant is None or plan.model != variant.hf_id:
        return None
    return int(variant.weights_gib * GIB)


def with_headroom(need: int) -> int:
    return need + int(need * HEADROOM_RATIO) + HEADROOM_BYTES


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where a directory yet to be made will be:
    its filesystem's free space). The one copy: bring-up and the doctor use it too."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(models_dir: Path, need: int) -> None:
    """Raise unless the models directory's filesystem has `need` bytes free, with headroom."""
    where = nearest_existing(models_dir)
    free = shutil.disk_usage(where).free
    wanted = with_headroom(need)
    if free < wanted:
        raise PreflightError(
            f"not enough disk space for the model weights: need {wanted / GIB:.1f} GiB in "
            f"{models_dir}, have {free / GIB:.1f} GiB free",
            hint=f"free space on the filesystem of {where}, or set models_dir in the appliance "
            "config to a directory on a larger disk",
        )


# ---------------------------------------------------------------------------- checksums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _git_oid(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _snapshot_files(snapshot: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():  # links into blobs/ count as the files they point at
            yield path.relative_to(snapshot).as_posix(), path


def _record_checksums(models_dir: Path, model: str, snapshot: Path) -> dict[str, Any]:
    """Hash every file of the snapshot (reusing the hashes of an earlier record for the same
    blob) and check it against the Hub's ETag, which names the blob: the sha256 of an LFS file,
    the git blob id of the rest. A mismatch removes the file and raises."""
    path = checksums_path(models_dir, model)
    earlier = _read_json(path)
    known = earlier.get("files", {}) if isinstance(earlier, dict) else {}
    files = {}
    for name, file in _snapshot_files(snapshot):
        blob = file.resolve().name
        size = file.stat().st_size
        old = known.get(name) or {}
        if old.get("blob") == blob and old.get("size") == size:
            files[name] = old
            continue
        sha256 = _sha256(file)
        bad = (len(blob) == 64 and blob != sha256) or (len(blob) == 40 and blob != _git_oid(file))
        if bad:
            file.resolve().unlink(missing_ok=True)
            file.unlink(missing_ok=True)
            raise WeightsCorruptError(
                f"{name} of {model} does not match the Hub's checksum ({blob[:12]}...): removed"
            )
        files[name] = {"sha256": sha256, "size": size, "blob": blob}
    record = {
        "model": model,
        "commit": snapshot.name,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # per writer
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(path)
    return record


def verify(models_dir: Path, model: str) -> list[str]:
    """The recorded files whose sha256 or size differ now (missing ones included)."""
    record = _read_json(checksums_path(models_dir, model))
    if not isinstance(record, dict):
        raise NotFoundError(
            f"no checksums recorded for {model} in {checksums_path(models_dir, model).parent}",
            hint="download it with `appliance up` (checksums are recorded after a download)",
        )
    snapshot = hub_cache(models_dir) / repo_folder(model) / "snapshots" / record["commit"]
    bad = []
    for name, row in record["files"].items():
        file = snapshot / name
        try:
            if file.stat().st_size != row["size"] or _sha256(file) != row["sha256"]:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def _set_mode(path: str | Path, mode: int) -> None:
    """chmod unless it has that mode already (weights put there by root stay untouched when
    a non-root check finds them readable)."""
    try:
        if os.stat(path).st_mode & 0o7777 == mode:
            return
        os.chmod(path, mode)
    except PermissionError:
        raise PreflightError(
            f"cannot make {path} readable by the appliance image's user (mode {mode:o} needed)",
            hint=f"run as the owner of {path} (root), or chmod it {mode:o}",
        ) from None


def _open_up(models_dir: Path, model: str) -> None:
    """Dirs 0755, files 0644 whatever the umask was (or the bundle, `hf download`): the way
    down to the repo, the repo, its lock files and its checksums (other repos in the cache are
    left as they are)."""
    hf, cache = models_dir / "hf", hub_cache(models_dir)
    for directory in (models_dir, hf, cache, hf / "checksums", cache / ".locks"):
        if directory.is_dir():
            _set_mode(directory, 0o755)
    for top in (cache / repo_folder(model), cache / ".locks" / repo_folder(model)):
        for root, _dirs, files in os.walk(top):
            _set_mode(root, 0o755)
            for name in files:
                if not os.path.islink(full := os.path.join(root, name)):
                    _set_mode(full, 0o644)
    for file in (cache / "CACHEDIR.TAG", checksums_path(models_dir, model)):
        if file.is_file():
            _set_mode(file, 0o644)


def bytes_on_disk(models_dir: Path, model: str) -> int:
    """What the repo's finished files take already: subtract it from required_bytes before
    check_disk when a download resumes."""
    blobs = hub_cache(models_dir) / repo_folder(model) / "blobs"
    try:
        return sum(f.stat().st_size for f in blobs.iterdir() if f.is_file())
    except OSError:
        return 0


# ---------------------------------------------------------------------------- download


def stray_token(models_dir: Path) -> str | None:
    """A warning (one line) when a Hugging Face token lies in the models dir: the backend's
    container would see it (HF_HOME=/models/hf)."""
    path = models_dir / "hf" / "token"
    if not path.exists():
        return None
    return (
        f"{path} holds a Hugging Face token that the backend's container can read: remove it "
        f"(set HF_TOKEN, or put it in {TOKEN_FILE}, root-owned, mode 0600)"
    )


def _token_file() -> str | None:
    """TOKEN_FILE's token; refused unless it is root's own and nobody else may read it."""
    try:
        st = TOKEN_FILE.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PreflightError(f"cannot read {TOKEN_FILE}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o7777 not in (0o600, 0o400):
        raise PreflightError(
            f"refusing the Hugging Face token in {TOKEN_FILE}: it must be a root-owned file of "
            f"mode 0600 or 0400 (it is {stat.filemode(st.st_mode)}, uid {st.st_uid})",
            hint=f"chown root:root {TOKEN_FILE} && chmod 600 {TOKEN_FILE}",
        )
    return TOKEN_FILE.read_text(encoding="utf-8").strip() or None


def _token(models_dir: Path) -> str | None:
    """HF_TOKEN, else TOKEN_FILE, else the hub's own token file unless it lies in the models
    dir (the backend's container reads that). Never one under the models dir. Handed to the
    library as a value: never argv, never logged."""
    from huggingface_hub import constants, get_token

    if warning := stray_token(models_dir):
        log.warning("%s", warning)
    if token := os.environ.get("HF_TOKEN", "").strip():
        return token
    if token := _token_file():
        return token
    hub_file = Path(constants.HF_TOKEN_PATH).absolute()
    if hub_file.is_relative_to(models_dir.absolute()):
        return None  # HF_HOME points into the models dir: its token is the container's too
    return get_token()


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(n, "") for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _bar_class(progress: bool) -> type:
    """The hub's progress bar, shown even when stderr is not a terminal (the bring-up's log
    keeps it) unless HF_HUB_DISABLE_PROGRESS_BARS; or none at all."""
    from huggingface_hub.utils.tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not progress:
                kwargs["disable"] = True
            elif kwargs.get("disable") is None:  # None: tqdm's own "only on a terminal"
                kwargs["disable"] = False
            super().__init__(*args, **kwargs)

    return Bar


def download(model: str, models_dir: Path, *, progress: bool = True) -> Path:
    """Make `model` present under <models_dir>/hf/hub and return its snapshot directory.

    Already present: no network. Else the Hub is asked what is missing, the disk checked for
    it, the files fetched (the hub's progress bar), checksums recorded, permissions opened."""
    if not is_hub_id(model):
        status = _local_status(Path(model).expanduser())
        if not status.present or status.path is None:
            raise NotFoundError(status.detail, hint="set inference.vllm.model to a complete model")
        return status.path
    status = weights_status(models_dir, model)
    if status.present and status.path is not None:
        # A bundle, `hf download` or a umask 077 may have put them there: the image reads them.
        _open_up(models_dir, model)
        return status.path
    endpoint = _endpoint()
    if _offline():
        raise HubUnreachableError(
            f"{model} is not on disk and downloads are off (HF_HUB_OFFLINE is set)",
            hint=OFFLINE_HINT + ", or unset HF_HUB_OFFLINE to download it",
        )
    from huggingface_hub import snapshot_download

    cache = hub_cache(models_dir)
    cache.mkdir(parents=True, exist_ok=True)
    token = _token(models_dir)
    common: dict[str, Any] = {
        "cache_dir": cache,
        "endpoint": endpoint,
        "token": token or False,
        "allow_patterns": ALLOW_PATTERNS,
    }
    with hub_errors(model, endpoint, token_sent=token is not None):
        planned = snapshot_download(model, dry_run=True, tqdm_class=_bar_class(False), **common)
        check_disk(models_dir, sum(f.file_size or 0 for f in planned if f.will_download))
        snapshot = Path(snapshot_download(model, tqdm_class=_bar_class(progress), **common))
    _record_checksums(models_dir, model, snapshot)
    _open_up(models_dir, model)
    return snapshot
