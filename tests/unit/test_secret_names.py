"""One rule for "is this a secret" (hardware/secret_names.py), asked by every layer: the planner's
extra_args filter, the backend's argv check and its masked command line, and the audit log's
redaction. Before, four rules disagreed: the planner kept `--tokenizer` and the backend then
refused to launch it, the audit log redacted `authorization` and `cookie` fields that the
backend's command line printed, and `TOKENIZERS_PARALLELISM` was masked while `--auth-key` was
not."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from appliance.audit import REDACTED, ChainWriter
from hardware.plan_types import PlanOverrides
from hardware.planner import plan_serving
from hardware.secret_names import (
    has_secret_value,
    is_secret_flag,
    is_secret_name,
    name_words,
    redact_secret_values,
)
from hardware.snapshot import HostSnapshot
from inference.backends.base import secret_flags
from inference.backends.process import ProcessBackend

REPO = Path(__file__).resolve().parents[2]
HOST = REPO / "tests" / "fixtures" / "hosts" / "h100_80gb_x1.json"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        # record fields (the audit log's cases)
        ("key", True),
        ("api_key", True),
        ("x-api-key", True),
        ("apiKey", True),
        ("APIKey", True),
        ("token", True),
        ("accessToken", True),
        ("client_secret", True),
        ("secret_sha256", True),
        ("authorization", True),
        ("Proxy-Authorization", True),
        ("password", True),
        ("cookie", True),
        ("key_id", False),
        ("keyId", False),
        ("key_name", False),
        ("key_file", False),
        ("prompt_tokens", False),
        ("daily_tokens", False),
        ("sandbox", False),
        ("", False),
        ("---", False),
        # environment variables
        ("VLLM_API_KEY", True),
        ("HF_TOKEN", True),
        ("HUGGING_FACE_HUB_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("TOKENIZERS_PARALLELISM", False),
        ("HF_TOKEN_PATH", False),
        ("UPSTREAM_KEY_FILE", False),
        ("KEYRING_BACKEND", False),
        ("CUDA_VISIBLE_DEVICES", False),
        # flags
        ("--api-key", True),
        ("--hf-token", True),
        ("--auth-key", True),
        ("--tokenizer", False),
        ("--tokenizer-mode", False),
        ("--max-num-batched-tokens", False),
        ("--return-tokens-as-token-ids", False),
        ("--ssl-keyfile", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_words_split_at_separators_and_humps() -> None:
    assert name_words("x-api-key") == ["x", "api", "key"]
    assert name_words("accessToken") == ["access", "token"]
    assert name_words("APIKey") == ["api", "key"]
    assert name_words("VLLM_API_KEY") == ["vllm", "api", "key"]


def test_a_flag_is_judged_by_its_name_and_a_value_is_not_a_flag() -> None:
    assert is_secret_flag("--hf-token=abc") and is_secret_flag("-token")
    assert not is_secret_flag("api_key")  # a value (no dash), e.g. the argument of --model
    assert not is_secret_flag("--seed=1")


def test_secret_values() -> None:
    text = "upstream said: bad key sk-app-0123456789abcdefghij, then Bearer eyJhbGciOi.x.y"
    assert has_secret_value(text)
    assert redact_secret_values(text, "[x]") == "upstream said: bad key [x], then [x]"
    assert not has_secret_value("sk-short and bearer")


# Names the old rules disagreed on, with the one answer every user now gives.
DISPUTED = [
    ("tokenizer", False),  # planner kept it, backend refused it: a plan that could not launch
    ("tokenizer-mode", False),
    ("auth-key", True),  # audit: secret; planner and backend: not
    ("x-auth", True),
    ("authorization", True),  # audit: secret; backend's env mask: not
    ("cookie", True),
    ("passwd", True),
    ("tokenizers-parallelism", False),  # backend's env mask: secret; audit: not
    ("hf-token-path", False),
    ("api-key-file", False),  # planner and backend: secret; audit: not (a path, like key_file)
    ("api-key", True),  # agreed before, and still
    ("hf-token", True),
]


def _planner_drops(flag: str) -> bool:
    host = HostSnapshot.model_validate_json(HOST.read_text())
    plan = plan_serving(host, PlanOverrides(extra_args=[flag, "v", "--seed=1"]))
    assert "--seed=1" in plan.argv
    dropped = any(flag in w and "secrets never go in argv" in w for w in plan.warnings)
    assert dropped is (flag not in plan.argv)
    return dropped


def _backend_refuses(flag: str, tmp_path: Path) -> bool:
    argv = ["vllm", "serve", "m", flag, "v"]
    try:
        ProcessBackend(argv, base_url="http://127.0.0.1:1", log_path=tmp_path / "log")
    except ValueError as exc:
        assert "secrets never go in argv" in str(exc)
        assert secret_flags(argv) == [flag]
        return True
    assert secret_flags(argv) == []
    return False


def _audit_redacts(field: str, tmp_path: Path) -> bool:
    rec = ChainWriter(tmp_path / "audit.jsonl").append("test.secret", **{field: "v"})
    return rec[field] == REDACTED


def _backend_masks_env(variable: str, tmp_path: Path) -> bool:
    backend = ProcessBackend(
        ["true"], base_url="http://127.0.0.1:1", log_path=tmp_path / "log", env={variable: "v"}
    )
    line = backend.command_line()
    assert line.startswith(f"{variable}=")
    return line.startswith(f"{variable}=***")


@pytest.mark.parametrize(("name", "secret"), DISPUTED)
def test_every_layer_gives_the_same_answer(name: str, secret: bool, tmp_path: Path) -> None:
    flag, field, variable = f"--{name}", name.replace("-", "_"), name.replace("-", "_").upper()
    answers = {
        "planner drops the flag": _planner_drops(flag),
        "backend refuses the flag": _backend_refuses(flag, tmp_path),
        "audit redacts the field": _audit_redacts(field, tmp_path),
        "command line masks the variable": _backend_masks_env(variable, tmp_path),
    }
    assert answers == dict.fromkeys(answers, secret)


def test_a_secret_looking_value_is_masked_whatever_its_name(tmp_path: Path) -> None:
    backend = ProcessBackend(
        ["true"],
        base_url="http://127.0.0.1:1",
        log_path=tmp_path / "log",
        env={"UPSTREAM": "sk-app-0123456789abcdefghij", "MODE": "fast"},
    )
    assert backend.command_line() == "MODE=fast UPSTREAM=*** true"


def test_the_rule_imports_only_the_stdlib() -> None:
    """The planner (hardware imports nothing of ours) and the egress proxy's audit writer use it."""
    tree = ast.parse((REPO / "hardware" / "secret_names.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                assert name == "__future__" or (name or "").split(".")[0] in sys.stdlib_module_names
