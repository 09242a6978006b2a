"""The sandbox policy model: YAML in with file:line errors, validation rules, YAML out."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.policy import Endpoint, Policy, load_policy, parse_policy
from sandbox.yamlfile import YamlError

REPO = Path(__file__).resolve().parents[2]


def test_unknown_field_names_file_and_line() -> None:
    text = "version: 1\nfilesystem:\n  read_only: []\n  writable: [/tmp]\n"
    with pytest.raises(YamlError) as err:
        parse_policy(text, "p.yaml")
    assert "p.yaml:4: filesystem.writable: unknown field" in str(err.value)


def test_root_never_writable() -> None:
    with pytest.raises(YamlError) as err:
        parse_policy("filesystem:\n  read_write: [/]\n", "p.yaml")
    assert "p.yaml:2:" in str(err.value) and "never writable" in str(err.value)


@pytest.mark.parametrize("path", ["tmp", "/a/../etc"])
def test_paths_must_be_absolute_without_dotdot(path: str) -> None:
    with pytest.raises(YamlError, match="absolute path"):
        parse_policy(f"filesystem:\n  read_only: ['{path}']\n", "p.yaml")


def test_uid_zero_rejected() -> None:
    with pytest.raises(YamlError) as err:
        parse_policy("process:\n  uid: 0\n", "p.yaml")
    assert "p.yaml:2: process.uid" in str(err.value)


def test_path_in_both_lists_rejected() -> None:
    with pytest.raises(YamlError, match="both read_only and read_write"):
        parse_policy("filesystem:\n  read_only: [/w]\n  read_write: [/w]\n", "p.yaml")


def test_wildcard_matches_subdomains_only() -> None:
    rule = Endpoint(host="*.example.com", ports=[443])
    assert rule.matches_host("api.example.com", 443)
    assert rule.matches_host("a.b.example.com", 443)
    assert not rule.matches_host("example.com", 443)
    assert not rule.matches_host("evilexample.com", 443)
    assert not rule.matches_host("api.example.com", 80)


@pytest.mark.parametrize("host", ["api.*.com", "*example.com", "a.*", "**.a.com"])
def test_wildcard_only_as_first_label(host: str) -> None:
    with pytest.raises(ValueError, match="first label"):
        Endpoint(host=host)


def test_explicit_deny_endpoint_parses() -> None:
    policy = parse_policy(
        "network:\n  allow:\n    - host: '*.npmjs.org'\n  deny:\n    - host: evil.npmjs.org\n",
        "p.yaml",
    )
    assert policy.network.deny[0].matches_host("evil.npmjs.org", 443)
    assert policy.network.allow[0].matches_host("evil.npmjs.org", 443)


def test_access_levels_and_paths() -> None:
    rule = Endpoint(host="a.com", access="read-only", paths=["/v1/**"])
    assert rule.allows_request("GET", "/v1/models?x=1")
    assert not rule.allows_request("POST", "/v1/models")
    assert not rule.allows_request("GET", "/v2/models")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2g", 2 * 1024**3), ("512m", 512 * 1024**2), ("1.5G", 1536 * 1024**2), ("1GiB", 1024**3)],
)
def test_memory_sizes(text: str, expected: int) -> None:
    assert parse_policy(f"resources:\n  memory: {text}\n", "p.yaml").resources.memory == expected


def test_bad_size_names_line() -> None:
    with pytest.raises(YamlError, match=r"p\.yaml:3: resources\.memory"):
        parse_policy("resources:\n  pids: 64\n  memory: lots\n", "p.yaml")


def test_round_trip_through_yaml() -> None:
    policy = load_policy(REPO / "sandbox" / "policies" / "openclaw.yaml")
    again = parse_policy(policy.to_yaml(), "again.yaml")
    assert again == policy


def test_static_part_excludes_network() -> None:
    policy = Policy()
    assert "network" not in policy.static_part()
    assert policy.with_network(policy.network).static_part() == policy.static_part()


@pytest.mark.parametrize("name", ["default", "openclaw"])
def test_shipped_policies_load(name: str) -> None:
    policy = load_policy(REPO / "sandbox" / "policies" / f"{name}.yaml")
    assert policy.process.uid != 0
    assert "/" not in policy.filesystem.read_write


def test_listen_ports_sorted() -> None:
    policy = parse_policy("process:\n  listen: [18789, 8080]\n", "p.yaml")
    assert policy.process.listen == [8080, 18789]
    assert parse_policy(policy.to_yaml(), "again.yaml") == policy  # round trip keeps them
    assert Policy().process.listen == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[80]", "not in 1024..65535"),  # privileged
        ("[0]", "not in 1024..65535"),
        ("[-1]", "not in 1024..65535"),
        ("[65536]", "not in 1024..65535"),
        ("[99999999999999999999]", "not in 1024..65535"),
        ("[3128]", "egress forwarder"),  # PID 1's own port: never the agent's
        ("[8080, 8080]", "repeat"),
        ("[true]", "valid integer"),  # YAML booleans are not ports
        ("['8080']", "valid integer"),  # nor strings that look like one
        ("[8080.0]", "valid integer"),
        ("8080", "valid list"),
        ("{a: 1}", "valid list"),
        ("[" + ", ".join(str(2000 + i) for i in range(17)) + "]", "at most 16"),
    ],
)
def test_listen_hostile_values_name_the_line(value: str, message: str) -> None:
    text = f"version: 1\nprocess:\n  uid: 1000\n  listen: {value}\n"
    with pytest.raises(YamlError) as err:
        parse_policy(text, "p.yaml")
    assert "p.yaml:4: process.listen" in str(err.value)
    assert message in str(err.value)
