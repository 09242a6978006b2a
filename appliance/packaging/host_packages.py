"""The Debian packages an appliance host needs, and their closure as a flat apt repository.

The lists are the ones ansible/roles/appliance_host/defaults/main.yml installs (a unit test keeps
the two equal). For an offline host, `download_closure` fetches every package those need, down to
libc6, so that a fresh `debootstrap --variant=minbase` host can install them from the bundle with
no network; `write_index` turns the directory into a repository apt reads as
`deb [trusted=yes] file:DIR ./` (the bundle's SHA256SUMS is what vouches for the files).

Alternatives and virtual packages are resolved the way apt resolves them on an empty system: the
first alternative, unless another one is already in the set (so `crun | runc` takes runc, which
the host asks for anyway). Only Depends and Pre-Depends are followed (hosts install without
Recommends). Downloads go through `apt-get download`, which checks each file against the signed
index; the cache is re-checked against the index's SHA256 before a file is reused.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

# Every host: the appliance's virtualenv, and python3-apt for Ansible's apt module (which would
# otherwise try to install it itself, from sources an offline host cannot reach).
BASE_PACKAGES: tuple[str, ...] = ("python3", "python3-venv", "python3-pip", "python3-apt")
# Rootless Podman with runc (crun refuses hybrid cgroups), newuidmap/newgidmap, debootstrap for the
# sandbox base image (built locally, never pulled).
SANDBOX_PACKAGES: tuple[str, ...] = (
    "podman",
    "runc",
    "conmon",
    "uidmap",
    "debootstrap",
    "debian-archive-keyring",
    "tar",
)
HOST_PACKAGES: tuple[str, ...] = BASE_PACKAGES + SANDBOX_PACKAGES
# Chosen over an earlier alternative: debootstrap puts usr-is-merged on every bookworm host, where
# apt then never installs `usrmerge | usr-is-merged`'s first choice (which drags in perl).
PREFERRED: frozenset[str] = frozenset({"usr-is-merged"})

INDEX_FILE = "Packages"
RELEASE_FILE = "Release"
DEFAULT_CACHE = Path("/var/cache/appliance/debs")
_DEPENDS_FLAGS = (
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
)
_FOLLOWED = ("Depends", "PreDepends")
_APT_ENV = {"LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

Progress = Callable[[str], None]


class HostPackagesError(ApplianceError):
    """The Debian package closure could not be resolved, downloaded or indexed."""

    hint = (
        "run it on a Debian host of the target's release and architecture whose apt sources "
        "are reachable"
    )


@dataclass(frozen=True)
class Alternative:
    name: str  # as apt-cache prints it, without <> (may carry :any)
    virtual: bool  # printed as <name>: no package of that name, only providers
    providers: tuple[str, ...] = ()  # other packages that Provide it


# One package's followed dependencies: a list of or-groups.
Groups = list[list[Alternative]]


@dataclass(frozen=True)
class IndexRecord:
    """A candidate version as the signed index describes it."""

    package: str
    version: str
    architecture: str
    filename: str  # pool/main/.../name_version_arch.deb
    size: int
    sha256: str

    @property
    def basename(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


def _noop(_: str) -> None:
    pass


def _apt(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, **_APT_ENV},
            check=False,
        )
    except OSError as exc:
        raise HostPackagesError(f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise HostPackagesError(f"{' '.join(argv[:2])} failed ({proc.returncode}): {tail}")
    return proc.stdout


def _base_name(name: str) -> str:
    return name.split(":", 1)[0]


def parse_depends(text: str) -> dict[str, Groups]:
    """`apt-cache depends` output -> {package: [or-group, ...]} for Depends and Pre-Depends.

    A line starting with `|` continues its or-group on the next line; `<name>` is a virtual
    package, followed by its providers indented by four spaces.
    """
    result: dict[str, Groups] = {}
    current: Groups | None = None
    group: list[Alternative] = []
    last: Alternative | None = None
    continues = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = None
            if not line.startswith("<"):
                current = result.setdefault(line.strip(), [])
            group, last, continues = [], None, False
            continue
        if current is None:
            continue
        if line.startswith("    "):
            if last is not None:  # a provider of the virtual package on the line before
                last = Alternative(
                    last.name, last.virtual, (*last.providers, _base_name(line.strip()))
                )
                group[-1] = last
            continue
        match = re.match(r"^ (\||\s)(\w+): (.+)$", line)
        if match is None:
            raise HostPackagesError(f"unexpected apt-cache depends line: {line!r}")
        bar, kind, target = match.groups()
        if kind not in _FOLLOWED:
            last = None
            continue
        if not continues:
            group = []
            current.append(group)
        virtual = target.startswith("<") and target.endswith(">")
        last = Alternative(target.strip("<>"), virtual)
        group.append(last)
        continues = bar == "|"
    return result


def _candidates(alt: Alternative) -> list[str]:
    """Packages that satisfy one alternative, in apt's order of preference."""
    if not alt.virtual:
        # A real package comes first; apt-cache also lists what else Provides it
        # (libsystemd0: libelogind0, which conflicts with it).
        return [_base_name(alt.name), *alt.providers]
    if alt.providers:
        return list(alt.providers)
    if ":" in alt.name:
        # `<perl:any>` with no provider listed is perl itself (Multi-Arch: allowed).
        return [_base_name(alt.name)]
    return []  # a virtual package nothing provides


def resolve(
    roots: Iterable[str],
    depends_of: Callable[[list[str]], dict[str, Groups]],
    prefer: frozenset[str] = frozenset(),
) -> set[str]:
    """The closure of `roots` under `depends_of`, choosing one alternative per or-group."""
    selected: set[str] = set(roots)
    todo = sorted(selected)
    while todo:
        deps = depends_of(todo)
        todo = []
        for name in sorted(deps):
            for group in deps[name]:
                options = [c for alt in group for c in _candidates(alt)]
                if not options:
                    raise HostPackagesError(
                        f"{name}: nothing can satisfy " + " | ".join(a.name for a in group)
                    )
                if any(o in selected for o in options):
                    continue
                pick = next((o for o in options if o in prefer), options[0])
                selected.add(pick)
                todo.append(pick)
    return selected


class _DependsTable:
    """`apt-cache depends` of every package, from one `--recurse` call over the roots.

    The recursion follows every alternative, so the table is a superset of what `resolve` visits;
    a name it lacks is asked for on its own.
    """

    def __init__(self, roots: Sequence[str]) -> None:
        self._known = self._ask(["--recurse", *roots])

    @staticmethod
    def _ask(args: Sequence[str]) -> dict[str, Groups]:
        return parse_depends(_apt(["apt-cache", "depends", *_DEPENDS_FLAGS, *args]))

    def __call__(self, names: list[str]) -> dict[str, Groups]:
        if missing := sorted({n for n in names if n not in self._known}):
            self._known.update(self._ask(missing))
        if unknown := [n for n in names if n not in self._known]:
            raise HostPackagesError(f"apt knows no package {', '.join(unknown)}")
        return {n: self._known[n] for n in names}


def closure(packages: Iterable[str], prefer: frozenset[str] = PREFERRED) -> list[str]:
    """Every package `packages` need on an empty system, alternatives chosen consistently."""
    roots = sorted(set(packages))
    depends_of = _DependsTable(roots)
    chosen = resolve(roots, depends_of, prefer)
    # Again, preferring what the first pass chose: an early `a | b` whose b came in later
    # should not keep a as well.
    for _ in range(5):
        again = resolve(roots, depends_of, prefer | chosen)
        if again == chosen:
            break
        chosen = again
    return sorted(chosen)


def parse_index(text: str) -> list[IndexRecord]:
    """Stanzas of `apt-cache show` / a Packages file -> records (those with a Filename)."""
    records: list[IndexRecord] = []
    for stanza in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" not in fields:
            continue
        if "Filename" not in fields or "SHA256" not in fields:
            raise HostPackagesError(
                f"{fields['Package']} {fields.get('Version', '')} is not available from any "
                "apt source (installed locally only?)"
            )
        records.append(
            IndexRecord(
                package=fields["Package"],
                version=fields["Version"],
                architecture=fields["Architecture"],
                filename=fields["Filename"],
                size=int(fields["Size"]),
                sha256=fields["SHA256"],
            )
        )
    return records


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _apt_download_name(rec: IndexRecord) -> str:
    # apt-get download writes name_version_arch.deb with the epoch's colon as %3a.
    return f"{rec.package}_{rec.version.replace(':', '%3a')}_{rec.architecture}.deb"


def _fetch(records: list[IndexRecord], cache: Path, progress: Progress) -> None:
    """Download into `cache` whatever is not there with the index's SHA256."""
    stale = [
        r
        for r in records
        if not (cache / r.basename).is_file() or _sha256(cache / r.basename) != r.sha256
    ]
    if not stale:
        return
    total = sum(r.size for r in stale) / 1e6
    progress(f"debs: downloading {len(stale)} packages ({total:.0f} MB)")
    # Root's apt downloads as _apt: a directory _apt cannot write makes it fall back to root
    # with a warning; the files are verified against the signed index either way.
    _apt(
        [
            "apt-get",
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            *(f"{r.package}={r.version}" for r in stale),
        ],
        cwd=cache,
    )
    for r in stale:
        got = cache / _apt_download_name(r)
        if not got.is_file():
            raise HostPackagesError(f"apt-get download wrote no {got.name}")
        got.replace(cache / r.basename)


def download_closure(
    dest: Path,
    packages: Sequence[str] = HOST_PACKAGES,
    progress: Progress = _noop,
    *,
    cache: Path | None = DEFAULT_CACHE,
) -> list[Path]:
    """Every .deb of the packages' closure in `dest` (candidate versions of the apt sources)."""
    names = closure(packages)
    progress(f"debs: {len(names)} packages in the closure of {', '.join(packages)}")
    records = parse_index(_apt(["apt-cache", "show", "--no-all-versions", *names]))
    got = {r.package for r in records}
    if missing := sorted(set(names) - got):
        raise HostPackagesError(f"no candidate version for: {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    store = cache or dest
    store.mkdir(parents=True, exist_ok=True)
    _fetch(records, store, progress)
    paths: list[Path] = []
    for rec in sorted(records, key=lambda r: r.package):
        target = dest / rec.basename
        if store != dest:
            target.unlink(missing_ok=True)
            try:
                os.link(store / rec.basename, target)  # same filesystem: no copy
            except OSError:
                shutil.copy2(store / rec.basename, target)
        if _sha256(target) != rec.sha256:
            raise HostPackagesError(f"{target.name}: SHA256 differs from the signed index")
        paths.append(target)
    size = sum(p.stat().st_size for p in paths) / 1e6
    progress(f"debs: {len(paths)} packages, {size:.0f} MB in {dest}")
    return paths


def _control(deb: Path) -> str:
    # Without field names dpkg-deb prints the whole control stanza (dpkg, not dpkg-dev).
    text = _apt(["dpkg-deb", "--field", str(deb)]).rstrip("\n")
    if not text.startswith("Package:"):
        raise HostPackagesError(f"{deb.name}: not a Debian package")
    return text


def _release(packages: bytes) -> str:
    # A Release file (unsigned: [trusted=yes]) lets apt check Packages against its hash and
    # spares the flat repository apt's retry loop over a missing Release. apt wants a Date.
    stamp = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    return (
        "Origin: gpu-appliance\n"
        "Label: appliance bundle\n"
        f"Date: {email.utils.formatdate(stamp, usegmt=True)}\n"
        "SHA256:\n"
        f" {hashlib.sha256(packages).hexdigest()} {len(packages)} {INDEX_FILE}\n"
    )


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_index(dest: Path) -> Path:
    """Write `dest/Packages` (and Release) for every .deb in `dest`: `deb file:DEST ./`."""
    stanzas: list[str] = []
    for deb in sorted(dest.glob("*.deb")):
        data = deb.read_bytes()
        stanzas.append(
            _control(deb)
            + f"\nFilename: ./{deb.name}"
            + f"\nSize: {len(data)}"
            + f"\nMD5sum: {hashlib.md5(data, usedforsecurity=False).hexdigest()}"
            + f"\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    if not stanzas:
        raise HostPackagesError(f"no .deb files in {dest}")
    packages = "\n".join(stanzas).encode()
    _replace(dest / INDEX_FILE, packages)
    _replace(dest / RELEASE_FILE, _release(packages).encode())
    return dest / INDEX_FILE
