"""appliance/packaging/host_packages.py: the host package lists match the Ansible role, apt-cache
output is parsed and its alternatives resolved as apt would, and write_index makes a flat
repository."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from appliance.packaging import host_packages as hp

ROLE_DEFAULTS = (
    Path(__file__).resolve().parents[2]
    / "ansible"
    / "roles"
    / "appliance_host"
    / "defaults"
    / "main.yml"
)

DEPENDS = """\
podman
  Depends: libc6
  Depends: conmon
 |Depends: crun
  Depends: runc
  Recommends: uidmap
conmon
  Depends: libc6
  Depends: libsystemd0
    libelogind0
runc
  Depends: libc6
crun
  Depends: libc6
libc6
  Depends: libgcc-s1
libgcc-s1
libsystemd0
  Depends: libc6
python3-venv
  Depends: <python3:any>
    python3
  Depends: <python3.11-distutils>
    python3-distutils
python3
ca-certificates
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
debconf
  PreDepends: <perl:any>
init-system-helpers
 |Depends: usrmerge
  Depends: usr-is-merged
    usrmerge
usrmerge
  Depends: perl
usr-is-merged
python3-distutils
perl
<perl:any>
"""


def test_the_lists_match_the_appliance_host_role() -> None:
    defaults = yaml.safe_load(ROLE_DEFAULTS.read_text())
    assert tuple(defaults["appliance_host_base_packages"]) == hp.BASE_PACKAGES
    assert tuple(defaults["appliance_host_sandbox_packages"]) == hp.SANDBOX_PACKAGES
    assert hp.HOST_PACKAGES == hp.BASE_PACKAGES + hp.SANDBOX_PACKAGES


def test_parse_depends_groups_alternatives_and_providers() -> None:
    table = hp.parse_depends(DEPENDS)
    assert "<perl:any>" not in table and "perl" in table
    podman = table["podman"]
    # Recommends are not followed; `crun | runc` is one group.
    assert [[a.name for a in g] for g in podman] == [["libc6"], ["conmon"], ["crun", "runc"]]
    systemd = table["conmon"][1][0]
    assert (systemd.name, systemd.virtual, systemd.providers) == (
        "libsystemd0",
        False,
        ("libelogind0",),
    )
    venv = table["python3-venv"][0][0]
    assert venv.virtual and venv.providers == ("python3",)
    assert table["debconf"][0][0].name == "perl:any"


def test_parse_depends_rejects_what_it_does_not_understand() -> None:
    with pytest.raises(hp.HostPackagesError, match="unexpected"):
        hp.parse_depends("podman\n  Depends libc6\n")


def _resolve(roots: list[str], prefer: frozenset[str] = frozenset()) -> set[str]:
    table = hp.parse_depends(DEPENDS)
    return hp.resolve(roots, lambda names: {n: table[n] for n in names}, prefer)


def test_resolve_takes_an_alternative_already_chosen() -> None:
    # runc is asked for: podman's `crun | runc` needs no crun.
    assert _resolve(["podman", "runc"]) == {
        "podman",
        "runc",
        "conmon",
        "libc6",
        "libgcc-s1",
        "libsystemd0",
    }


def test_resolve_takes_a_real_package_before_its_providers() -> None:
    chosen = _resolve(["conmon"])
    assert "libsystemd0" in chosen and "libelogind0" not in chosen


def test_resolve_virtual_packages_through_their_providers() -> None:
    assert _resolve(["python3-venv"]) == {"python3-venv", "python3", "python3-distutils"}
    # `debconf | debconf-2.0`: the first; <perl:any> with no provider listed is perl.
    assert _resolve(["ca-certificates"]) == {"ca-certificates", "debconf", "perl"}


def test_resolve_honours_preferences() -> None:
    assert _resolve(["init-system-helpers"]) == {"init-system-helpers", "usrmerge", "perl"}
    assert _resolve(["init-system-helpers"], hp.PREFERRED) == {
        "init-system-helpers",
        "usr-is-merged",
    }


def test_resolve_fails_on_an_unsatisfiable_group() -> None:
    table = hp.parse_depends("a\n  Depends: <nothing-provides-this>\n")
    with pytest.raises(hp.HostPackagesError, match="nothing can satisfy"):
        hp.resolve(["a"], lambda names: {n: table[n] for n in names})


def test_parse_index_needs_a_downloadable_record() -> None:
    records = hp.parse_index(
        "Package: runc\nVersion: 1:1.1.5+ds1-1\nArchitecture: amd64\n"
        "Filename: pool/main/r/runc/runc_1.1.5+ds1-1_amd64.deb\nSize: 10\nSHA256: ab\n"
        "Description: x\n more\n"
    )
    assert records[0].basename == "runc_1.1.5+ds1-1_amd64.deb"
    assert hp._apt_download_name(records[0]) == "runc_1%3a1.1.5+ds1-1_amd64.deb"
    with pytest.raises(hp.HostPackagesError, match="not available from any apt source"):
        hp.parse_index("Package: local\nVersion: 1\nArchitecture: all\n")


def _deb(tmp_path: Path, name: str, version: str) -> Path:
    root = tmp_path / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: test <test@example.invalid>\nDescription: a test package\n two lines\n"
    )
    (root / "usr" / "share" / name).mkdir(parents=True)
    (root / "usr" / "share" / name / "file").write_text(name)
    out = tmp_path / "repo" / f"{name}_{version}_all.deb"
    out.parent.mkdir(exist_ok=True)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb: not a Debian host")
def test_write_index_makes_a_flat_repository(tmp_path: Path) -> None:
    debs = [_deb(tmp_path, "alpha", "1.0"), _deb(tmp_path, "beta", "2:0.1")]
    index = hp.write_index(tmp_path / "repo")
    stanzas = hp.parse_index(index.read_text())
    assert [(r.package, r.version) for r in stanzas] == [("alpha", "1.0"), ("beta", "2:0.1")]
    for rec, deb in zip(stanzas, debs, strict=True):
        assert rec.filename == f"./{deb.name}"
        assert rec.size == deb.stat().st_size
        assert rec.sha256 == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert " two lines\n" in index.read_text()  # the whole control stanza, continuation lines too
    release = (tmp_path / "repo" / hp.RELEASE_FILE).read_text()
    digest = hashlib.sha256(index.read_bytes()).hexdigest()
    assert f" {digest} {index.stat().st_size} Packages\n" in release
    assert "\nDate: " in release


def test_write_index_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(hp.HostPackagesError, match=r"no \.deb files"):
        hp.write_index(tmp_path)
