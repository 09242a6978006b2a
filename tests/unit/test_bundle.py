"""The offline bundle's checks, on small synthetic bundles: verify catches every kind of damage,
tarballs with unsafe members are refused, the manifest must match this host, and install.sh is
valid shell that checks the sums before anything else."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ConfigError
from appliance.packaging import bundle as b


def make_bundle(root: Path) -> Path:
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "requirements.txt").write_text("gpu-appliance==0.1.0\n")
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "models" / "tiny" / "weights.bin").write_bytes(os.urandom(4096))
    manifest = {
        "format": b.FORMAT,
        "appliance_version": "0.1.0",
        "arch": b.dpkg_arch(),
        "python": b.python_tag(),
        "sections": {"models": [{"name": "tiny", "dir": True}]},
    }
    (root / b.MANIFEST).write_text(json.dumps(manifest))
    (root / b.INSTALL_SH).write_text(b._install_sh())
    b.write_sums(root)
    return root


def test_a_whole_bundle_verifies_and_sha256sum_agrees(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle")
    result = b.verify_bundle(root)
    assert result.ok and result.checked == 4
    # The same file checks with coreutils alone (what install.sh and Ansible run).
    proc = subprocess.run(["sha256sum", "--check", "--strict", "--quiet", b.SUMS], cwd=root)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda r: (r / "models/tiny/weights.bin").write_bytes(b"x"), "checksum mismatch"),
        (lambda r: (r / "models/tiny/weights.bin").unlink(), "missing"),
        (lambda r: (r / "wheels/evil.whl").write_bytes(b"x"), "not listed"),
        (lambda r: (r / "link").symlink_to("/etc/passwd"), "symbolic link"),
    ],
)
def test_verify_reports_each_kind_of_damage(tmp_path: Path, damage, expect: str) -> None:
    root = make_bundle(tmp_path / "bundle")
    damage(root)
    result = b.verify_bundle(root)
    assert not result.ok
    assert any(expect in line for line in result.bad), result.bad


def test_a_sums_line_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle")
    with open(root / b.SUMS, "a") as fh:
        fh.write(f"{'0' * 64}  ../outside\n")
    with pytest.raises(b.BundleError, match=r"SHA256SUMS:\d+:"):
        b.verify_bundle(root)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(b.BundleError, match="not a bundle"):
        b.verify_bundle(tmp_path)


def test_install_refuses_a_damaged_bundle_before_touching_anything(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle")
    (root / "models/tiny/weights.bin").write_bytes(b"tampered")
    config = ApplianceConfig(state_dir=tmp_path / "state", models_dir=tmp_path / "models")
    with pytest.raises(b.BundleError, match="fail verification, installing nothing"):
        b.install_bundle(root, b.InstallOptions(wheels=False, images=False), config)
    assert not (tmp_path / "models").exists()


def test_install_copies_models_once_then_changes_nothing(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle")
    config = ApplianceConfig(state_dir=tmp_path / "state", models_dir=tmp_path / "models")
    options = b.InstallOptions(wheels=False, images=False)
    first = b.install_bundle(root, options, config)
    assert first.changed and "models" in first.steps
    copied = tmp_path / "models" / "tiny" / "weights.bin"
    assert copied.read_bytes() == (root / "models/tiny/weights.bin").read_bytes()
    assert not b.install_bundle(root, options, config).changed


def test_operator_blueprints_need_a_configured_directory(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    (root / "blueprints" / "mine" / "1.0.0").mkdir(parents=True)
    (root / "blueprints" / "mine" / "1.0.0" / "blueprint.yaml").write_text("name: mine\n")
    make_bundle(root)
    config = ApplianceConfig(state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match=r"blueprints\.dirs"):
        b.install_bundle(root, b.InstallOptions(wheels=False, images=False), config)


def test_a_bundle_for_another_architecture_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle")
    manifest = json.loads((root / b.MANIFEST).read_text())
    manifest["arch"] = "riscv64"
    (root / b.MANIFEST).write_text(json.dumps(manifest))
    b.write_sums(root)
    config = ApplianceConfig(state_dir=tmp_path / "state")
    with pytest.raises(b.BundleError, match="riscv64"):
        b.install_bundle(root, b.InstallOptions(wheels=False, images=False), config)


def test_tarball_round_trip_and_unsafe_members(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "src" / "bundle")
    tarball = tmp_path / "bundle.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname="bundle")
    with b.opened(tarball) as unpacked:
        assert unpacked.parent.parent == tmp_path and unpacked.name == "bundle"
        assert b.verify_bundle(unpacked).ok
    assert not unpacked.exists()  # the scratch copy is gone
    # A damaged copy inside the tarball is caught even with a good directory beside it.
    (root / "models/tiny/weights.bin").write_bytes(b"tampered")
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname="bundle")
    (tmp_path / "bundle").mkdir()
    with b.opened(tarball) as unpacked:
        assert not b.verify_bundle(unpacked).ok

    for name, kind in (("../escape", tarfile.REGTYPE), ("bundle/link", tarfile.SYMTYPE)):
        evil = tmp_path / f"evil-{kind!r}.tar"
        with tarfile.open(evil, "w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        with pytest.raises(b.BundleError, match="refusing member"):
            b.unpack(evil, tmp_path)
    assert not (tmp_path / "escape").exists()


def test_install_sh_is_valid_shell_and_checks_sums_first(tmp_path: Path) -> None:
    script = b._install_sh()
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    # A damaged bundle stops install.sh before a virtualenv is made.
    root = make_bundle(tmp_path / "bundle")
    (root / "models/tiny/weights.bin").write_bytes(b"tampered")
    proc = subprocess.run(
        ["sh", str(root / b.INSTALL_SH), str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        env={**os.environ, "CLI_LINK": ""},
    )
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr
    assert not (tmp_path / "venv").exists()
