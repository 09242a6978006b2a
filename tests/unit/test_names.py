"""One name rule for sandboxes, agents and keys, checked before anything is written; deletes
only ever inside the directory a command owns; config and policy files that are not UTF-8 or
do not exist are config errors (exit 3), not crashes.

The CLI runs in-process through `appliance.cli.main.main` (the real exit-code table); the
sandbox/agent paths that need Podman are in tests/integration/test_hostile_names.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.errors import ConfigError, exit_code_for

# Each must be refused. NUL cannot travel in argv: it is checked here, in-process.
HOSTILE: dict[str, str] = {
    "empty": "",
    "dot": ".",
    "dotdot": "..",
    "parent": "../x",
    "slash": "a/b",
    "space": "a b",
    "newline": "a\nb",
    "trailing-newline": "ab\n",  # `$` matches before a final newline: the rule must not
    "nul": "a\x00b",
    "300-chars": "a" * 300,
    "64-chars": "a" * 64,
    "cyrillic-a": "\u0430gent",  # Cyrillic small a, looks like 'agent'
    "fullwidth": "\uff41gent",  # fullwidth a
    "fullwidth-digit": "agent\uff11",
    "uppercase": "Agent",
    "leading-dash": "-agent",
    "underscore": "my_agent",
    "dot-inside": "my.agent",
    "tab": "a\tb",
    "backslash": "a\\b",
    # the shared directory every sandbox mounts (`sandboxes/supervisor`): reserved
    "supervisor": "supervisor",
}
GOOD = ["a", "0", "web-agent-1", "a" * 63, "9-lives", "x-"]


@pytest.mark.parametrize("name", GOOD)
def test_the_rule_accepts_plain_names(name: str) -> None:
    from sandbox.names import check_name

    assert check_name(name, "sandbox") == name


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_rule_refuses_hostile_names_with_one_line_and_a_hint(case: str) -> None:
    from sandbox.names import InvalidNameError, check_name

    with pytest.raises(InvalidNameError) as info:
        check_name(HOSTILE[case], "sandbox")
    message = str(info.value)
    assert "\n" not in message and "\x00" not in message, message
    assert len(message) < 200, message  # a 300-char name is shown shortened
    assert message.startswith("invalid sandbox name ")
    assert info.value.hint and "a-z, 0-9 and '-'" in info.value.hint
    assert exit_code_for(info.value) == 3  # a config error, as ConfigError


def test_every_shared_directory_name_is_reserved() -> None:
    """What the control plane keeps beside the sandboxes' own directories (the supervisor's
    code, mounted read-only by every sandbox) can never be a sandbox's, an agent's or a key's
    name: `rm` of that name would delete what every sandbox runs."""
    from sandbox.names import RESERVED, SHARED_SANDBOX_DIRS, is_valid

    assert SHARED_SANDBOX_DIRS <= RESERVED
    assert "supervisor" in SHARED_SANDBOX_DIRS
    assert not any(is_valid(name) for name in RESERVED)


# -- the keys CLI and store: nothing written for a hostile name -----------------------------


def _tree(root: Path) -> dict[str, int]:
    """Every path under root with its size (files) or -1 (directories)."""
    if not root.exists():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = -1
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


@pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"nul"}))
@pytest.mark.usefixtures("control_plane")  # `keys list` reads through its API
def test_keys_create_refuses_hostile_names_and_writes_nothing(
    case: str, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = isolated_env / "state"
    assert main(["keys", "list"]) == 0  # the store exists: rows and files can be compared
    before = _tree(state)
    capsys.readouterr()
    code = main(["keys", "create", "--", HOSTILE[case]])  # `--`: "-agent" is a name here
    err = capsys.readouterr().err
    assert code in (2, 3), err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("appliance: error: invalid key name "), err
    assert lines[1].startswith("  hint: "), err
    assert _tree(state) == before
    from appliance.store.inference_store import InferenceStore

    with InferenceStore(state) as store:
        assert store.list_keys() == []


def test_keys_create_on_a_fresh_state_dir_with_a_bad_name_creates_no_state_dir(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "../x"]) == 3
    assert not (isolated_env / "state").exists()
    assert not (isolated_env / "x").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_key_store_refuses_hostile_names(case: str, isolated_env: Path) -> None:
    from appliance.store.inference_store import InferenceStore
    from sandbox.names import InvalidNameError

    with InferenceStore(isolated_env / "state") as store:
        with pytest.raises(InvalidNameError):
            store.create_key(HOSTILE[case], "client")
        if case not in ("empty", "leading-dash"):  # `sandbox-`, `sandbox--agent` are names
            with pytest.raises(InvalidNameError):  # a sandbox's key: `sandbox-` + a name
                store.create_key("sandbox-" + HOSTILE[case], "sandbox")
        assert store.list_keys() == []


def test_a_sandbox_key_takes_the_longest_sandbox_name(isolated_env: Path) -> None:
    from appliance.store.inference_store import InferenceStore

    with InferenceStore(isolated_env / "state") as store:
        key, _ = store.create_key("sandbox-" + "a" * 63, "sandbox")
        assert key.name == "sandbox-" + "a" * 63


def test_sandbox_and_agent_create_refuse_before_touching_the_state_dir(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the policy file is read, root is needed or the store is opened."""
    policy = isolated_env / "p.yaml"
    policy.write_text("version: 1\n")
    for argv in (
        ["sandbox", "create", "../evil", "--policy", str(policy)],
        ["sandbox", "create", "", "--policy", str(policy)],
        ["agent", "create", "../ag", "--blueprint", "shell"],
        ["agent", "create", "a b", "--blueprint", "shell"],
    ):
        capsys.readouterr()
        assert main(argv) == 3, argv
        err = capsys.readouterr().err
        assert err.startswith("appliance: error: invalid ") and "\n  hint: " in err, err
    assert not (isolated_env / "state").exists()
    assert not (isolated_env / "evil").exists()


# -- deletes only inside the directory a command owns ---------------------------------------


def test_owned_child_accepts_only_strict_children(tmp_path: Path) -> None:
    from sandbox.lifecycle.owned_paths import UnsafePathError, owned_child

    parent = tmp_path / "sandboxes"
    parent.mkdir()
    assert owned_child(parent, parent / "web") == parent / "web"
    assert owned_child(parent, parent / "web" / "egress") == parent / "web" / "egress"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (parent / "link").symlink_to(outside)
    for bad in (
        parent,  # the nameless sandbox: the shared directory itself
        parent / "",
        parent / ".",
        parent / "..",
        parent / ".." / "x",
        parent / "link" / "x",  # through a symlink to outside
        tmp_path,
        Path("/"),
    ):
        with pytest.raises(UnsafePathError):
            owned_child(parent, bad)


def test_remove_owned_deletes_the_child_and_refuses_the_parent(tmp_path: Path) -> None:
    from sandbox.lifecycle.owned_paths import UnsafePathError, remove_owned

    parent = tmp_path / "sandboxes"
    (parent / "a" / "egress").mkdir(parents=True)
    (parent / "b").mkdir()
    remove_owned(parent, parent / "a")
    assert not (parent / "a").exists() and (parent / "b").is_dir()
    remove_owned(parent, parent / "gone")  # nothing there: nothing to do
    with pytest.raises(UnsafePathError):
        remove_owned(parent, parent / ".")
    assert (parent / "b").is_dir()
    # a symlink child is removed as a link, never followed
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (parent / "c").symlink_to(victim)
    remove_owned(parent, parent / "c")
    assert not (parent / "c").exists() and (victim / "keep").is_file()


# -- config and policy files -----------------------------------------------------------------


def test_a_policy_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox.lifecycle.errors import PolicyFileError
    from sandbox.lifecycle.manager import read_policy_file

    bad = tmp_path / "policy.yaml"
    bad.write_bytes(b"version: 1\nnetwork:\n  allow:\n    - host: caf\xe9.example\n")
    with pytest.raises(PolicyFileError, match=rf"^{bad}: not UTF-8"):
        read_policy_file(bad)
    code = main(["sandbox", "create", "web", "--policy", str(bad)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert err.startswith(f"appliance: error: {bad}: not UTF-8"), err


def test_a_blueprint_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "blueprint.yaml"
    bad.write_bytes(b"name: x\ndescription: \xff\xfe\n")
    code = main(["blueprint", "validate", str(bad)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"{bad}: not UTF-8" in err.splitlines()[0], err


def test_a_config_file_that_is_not_utf8_is_a_config_error(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = isolated_env / "extra.yaml"
    bad.write_bytes(b"gateway:\n  port: 8080 # \xe9\n")
    assert main(["--config", str(bad), "config", "show"]) == 3
    assert f"{bad}: not UTF-8" in capsys.readouterr().err


def test_a_missing_config_file_is_an_error_not_ignored(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = isolated_env / "missing.yaml"
    assert main(["--config", str(missing), "config", "show"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"appliance: error: {missing}: no such config file"), err
    assert "\n  hint: " in err
    # the environment variable names the same layer: same error, for services too
    from appliance.config import load_config

    with pytest.raises(ConfigError, match="no such config file"):
        load_config(environ={"APPLIANCE_CONFIG": str(missing)})


def test_bundle_install_writes_only_inside_its_destination(tmp_path: Path) -> None:
    """A bundle's files land in the operator's blueprints/models dir: a symlink already there
    (to a directory or a file outside) is never written through."""
    import hashlib

    from appliance.packaging.bundle import _sync_tree
    from sandbox.lifecycle.owned_paths import UnsafePathError

    root, dest, outside = tmp_path / "bundle", tmp_path / "dest", tmp_path / "outside"
    for d in (root / "models" / "sub", dest, outside):
        d.mkdir(parents=True)
    (root / "models" / "sub" / "w.bin").write_bytes(b"weights")
    (root / "models" / "cfg.json").write_bytes(b"{}")
    digests = {
        rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
        for rel in ("models/sub/w.bin", "models/cfg.json")
    }
    (outside / "cfg.json").write_text("victim")
    (dest / "cfg.json").symlink_to(outside / "cfg.json")  # a file link: replaced, not followed
    (dest / "sub").symlink_to(outside)  # a directory link: refused
    with pytest.raises(UnsafePathError):
        _sync_tree(root, "models", dest, digests)
    assert (outside / "cfg.json").read_text() == "victim"
    assert not (outside / "w.bin").exists()
    (dest / "sub").unlink()
    assert _sync_tree(root, "models", dest, digests) is True
    assert (outside / "cfg.json").read_text() == "victim"
    assert not (dest / "cfg.json").is_symlink() and (dest / "cfg.json").read_bytes() == b"{}"
    assert (dest / "sub" / "w.bin").read_bytes() == b"weights"


def test_a_file_that_vanishes_during_removal_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sandbox rm` removes the sandbox's private dir while its egress proxy, being stopped,
    unlinks its own admin socket: rmtree then finds the name gone (seen in CI as
    `FileNotFoundError: 'proxy-admin.sock'`)."""
    import os as os_module

    from sandbox.lifecycle.owned_paths import remove_owned

    tree = tmp_path / "sandboxes" / "box"
    tree.mkdir(parents=True)
    (tree / "proxy-admin.sock").write_text("")
    (tree / "keep").write_text("")
    real_unlink = os_module.unlink

    def racing_unlink(path: object, *args: object, **kwargs: object) -> None:
        if str(path).endswith("proxy-admin.sock"):
            real_unlink(tree / "proxy-admin.sock")  # the proxy got there first
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os_module, "unlink", racing_unlink)
    remove_owned(tmp_path / "sandboxes", tree)
    assert not tree.exists()
