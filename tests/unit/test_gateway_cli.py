"""`appliance keys` and `appliance budget` (mounted here on their own; main.py registers them)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from appliance.cli import budget, keys
from appliance.store.inference_store import InferenceStore
from inference.ports import Reservation, UsageRecord

root = typer.Typer()
root.add_typer(keys.app, name="keys")
root.add_typer(budget.app, name="budget")
runner = CliRunner()
# The commands are clients of the control plane (keys and budgets change state through its API).
pytestmark = pytest.mark.usefixtures("control_plane")


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(root, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        return 1, f"{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, result.output


def state_store() -> InferenceStore:
    return InferenceStore(Path(os.environ["APPLIANCE_STATE_DIR"]))


def test_create_prints_the_secret_once_and_list_never_does() -> None:
    code, out = cli("keys", "create", "laptop", "--json")
    assert code == 0, out
    created = json.loads(out)
    assert created["secret"].startswith("sk-app-") and created["owner_kind"] == "client"
    code, out = cli("keys", "create", "agent-1", "--sandbox")
    assert code == 0 and "sk-app-" in out and "not shown again" in out
    code, out = cli("keys", "list", "--json")
    listed = json.loads(out)
    assert [(k["name"], k["owner_kind"], k["state"]) for k in listed] == [
        ("laptop", "client", "live"),
        ("agent-1", "sandbox", "live"),
    ]
    assert "sk-app-" not in out
    assert state_store().authenticate(created["secret"]) is not None


def test_revoke_by_name_or_id() -> None:
    cli("keys", "create", "a")
    _, out = cli("keys", "create", "b", "--json")
    key_id = json.loads(out)["id"]
    assert cli("keys", "revoke", "a")[0] == 0
    assert cli("keys", "revoke", key_id)[0] == 0
    code, out = cli("keys", "revoke", "a")
    assert code != 0 and "no live key" in out
    _, out = cli("keys", "list")
    assert out.count("revoked") == 2


def test_budget_set_and_show() -> None:
    _, out = cli("keys", "create", "agent", "--json")
    key_id = json.loads(out)["id"]
    code, out = cli("budget", "set", "agent", "--daily-tokens", "1000", "--monthly-cost", "5")
    assert code == 0 and "daily tokens 1000" in out and "monthly cost 5" in out
    cli("budget", "set", "agent", "--monthly-tokens", "20000")  # the others are kept
    store = state_store()
    store.record_usage(UsageRecord(key_id, "nemotron", 700, 150, 0.1, 200, False, 0.5))
    code, out = cli("budget", "show", "agent", "--json")
    assert code == 0, out
    (row,) = json.loads(out)
    assert row["state"] == "warning" and row["spend"]["day_tokens"] == 850
    limits = {lim["budget"]: lim for lim in row["limits"]}
    assert set(limits) == {"daily_tokens", "monthly_tokens", "monthly_cost"}
    assert limits["daily_tokens"]["percent"] == 85.0
    code, out = cli("budget", "show")
    assert code == 0 and "agent" in out and "warning" in out
    # A request in flight holds its reservation: shown, and counted against the limits.
    store.reserve(key_id, time.time(), lambda s, r: Reservation(
        "req_x", key_id, "nemotron", True, 60, 40, 0.0, time.time(), "1:1"))  # fmt: skip
    (row,) = json.loads(cli("budget", "show", "agent", "--json")[1])
    assert row["reserved"]["day_tokens"] == 100 and row["spend"]["day_tokens"] == 850
    assert {lim["budget"]: lim["percent"] for lim in row["limits"]}["daily_tokens"] == 95.0
    assert "100 tok" in cli("budget", "show")[1]
    cli("budget", "set", "agent", "--clear", "--daily-cost", "1")
    (row,) = json.loads(cli("budget", "show", "agent", "--json")[1])
    assert [lim["budget"] for lim in row["limits"]] == ["daily_cost"]


def test_budget_for_unknown_key_is_not_found() -> None:
    code, out = cli("budget", "set", "ghost", "--daily-tokens", "1")
    assert code != 0 and "NotFoundError" in out
    code, out = cli("budget", "show", "ghost")
    assert code != 0 and "NotFoundError" in out


def test_bad_key_name_is_an_appliance_error() -> None:
    code, out = cli("keys", "create", "bad name")
    assert code != 0 and "KeyNameError" in out


def test_create_with_allowed_models_and_list_shows_them() -> None:
    code, out = cli(
        "keys", "create", "scoped", "--allow-model", "default", "--allow-model", "default",
        "--json",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["allowed_models"] == ["default"]
    assert cli("keys", "create", "open")[0] == 0
    listed = {k["name"]: k["allowed_models"] for k in json.loads(cli("keys", "list", "--json")[1])}
    assert listed == {"scoped": ["default"], "open": None}  # null: any model
    _, out = cli("keys", "list")
    assert "default" in out and "any" in out
    assert state_store().find_key("scoped").allowed_models == ("default",)


def test_an_allowed_model_not_served_here_is_a_warning() -> None:
    code, out = cli("keys", "create", "typo", "--allow-model", "nemotorn")
    assert code == 0 and "'nemotorn' is not served here" in out
    code, out = cli("keys", "create", "bad-model", "--allow-model", "two words")
    assert code != 0 and "invalid model name 'two words'" in out  # the store's KeyModelError


def test_a_metrics_scope_only_for_client_keys() -> None:
    code, out = cli("keys", "create", "prometheus", "--scope", "metrics", "--json")
    assert code == 0, out
    created = json.loads(out)
    assert created["scopes"] == ["metrics"]
    assert state_store().authenticate(created["secret"]).scopes == ("metrics",)
    code, out = cli("keys", "create", "plain", "--json")
    assert json.loads(out)["scopes"] == []
    code, out = cli("keys", "create", "agent-2", "--sandbox", "--scope", "metrics")
    assert code != 0 and "takes no scopes" in out
    code, out = cli("keys", "create", "other", "--scope", "admin")
    assert code != 0 and "unknown key scope 'admin'" in out
    assert [k.name for k in state_store().list_keys()] == ["prometheus", "plain"]
