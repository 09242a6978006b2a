"""The `notify:` config section: hostile input is refused with the file and line at fault."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, load_config
from appliance.errors import ConfigError

GOOD = """\
notify:
  one_tap: true
  console_url: https://console.example.org/appliance
  webhooks:
    - name: ops-json
      url: https://hooks.example.org/appliance
      events: [approval.pending, agent.killed]
      secret_env: OPS_HOOK_SECRET
    - name: team_slack
      url: https://hooks.slack.com/services/T0/B0/XYZ
      events: [budget.stop]
      format: slack
    - name: phone
      url: http://127.0.0.1:8099/appliance
      events: [approval.pending]
      format: ntfy
      secret_file: /etc/appliance/ntfy.secret
      timeout_s: 3
"""


def load(tmp_path: Path, text: str) -> ApplianceConfig:
    path = tmp_path / "appliance.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(environ={"APPLIANCE_CONFIG": str(path), "XDG_CONFIG_HOME": str(tmp_path)})


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    return str(err.value)


def test_a_good_section(tmp_path: Path) -> None:
    notify = load(tmp_path, GOOD).notify
    assert notify.one_tap and notify.console_url == "https://console.example.org/appliance"
    assert [h.name for h in notify.webhooks] == ["ops-json", "team_slack", "phone"]
    assert notify.webhooks[0].format == "json" and notify.webhooks[0].timeout_s == 10.0
    assert notify.webhooks[2].secret_file == Path("/etc/appliance/ntfy.secret")


def test_default_is_no_webhooks(tmp_path: Path) -> None:
    notify = load(tmp_path, "{}\n").notify
    assert notify.webhooks == [] and not notify.one_tap and notify.console_url is None


def test_unknown_event_is_named_with_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("[budget.stop]", "\n        - budget.stop\n        - approval.pendng")
    message = refused(tmp_path, text)
    assert f"{tmp_path / 'appliance.yaml'}:13:" in message
    assert "unknown event 'approval.pendng'" in message and "approval.pending" in message


@pytest.mark.parametrize(
    "url",
    ["ftp://hooks.example.org/x", "javascript:alert(1)", "file:///etc/passwd", "hooks.example.org",
     "http://", "https://user:pw@hooks.example.org/x", "http://exa mple.org/",
     '"http://a.org/\\x00x"', "http://[::1/x"],
)  # fmt: skip
def test_only_http_urls_without_credentials(tmp_path: Path, url: str) -> None:
    message = refused(tmp_path, GOOD.replace("https://hooks.example.org/appliance", url))
    assert f"{tmp_path / 'appliance.yaml'}:6: notify.webhooks.0.url" in message


def test_both_secret_sources_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace(
        "secret_env: OPS_HOOK_SECRET", "secret_env: OPS_HOOK_SECRET\n      secret_file: /x"
    )
    message = refused(tmp_path, text)
    assert ":5: notify.webhooks.0: webhook 'ops-json': give secret_env or secret_file" in message


def test_a_json_webhook_needs_a_secret(tmp_path: Path) -> None:
    message = refused(tmp_path, GOOD.replace("      secret_env: OPS_HOOK_SECRET\n", ""))
    assert "a json webhook's bodies are signed" in message


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, GOOD.replace("name: phone", "name: ops-json"))
    assert ":4: notify.webhooks: two webhooks are named 'ops-json'" in message


@pytest.mark.parametrize("name", ["", "Ops", "a b", "../x", "-x", "x" * 64, "ü"])
def test_hostile_names_are_refused(tmp_path: Path, name: str) -> None:
    message = refused(tmp_path, GOOD.replace("name: phone", f"name: {name!r}"))
    assert "notify.webhooks.2.name" in message


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("format: ntfy", "format: xml", "notify.webhooks.2.format"),
        ("timeout_s: 3", "timeout_s: 0", "notify.webhooks.2.timeout_s"),
        ("events: [budget.stop]", "events: []", "notify.webhooks.1.events"),
        ("one_tap: true", "one_tap: maybe", "notify.one_tap"),
        ("https://console.example.org/appliance", "ftp://x", "notify.console_url"),
        ("  one_tap: true", "  one_tap: true\n  retries: 9", "notify.retries: unknown field"),
    ],
)
def test_other_bad_values(tmp_path: Path, old: str, new: str, where: str) -> None:
    assert where in refused(tmp_path, GOOD.replace(old, new))


def test_the_config_does_not_import_the_control_plane() -> None:
    code = (
        "import sys, appliance.config\n"
        "bad = sorted(m for m in sys.modules if m.startswith('appliance.control'))\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
