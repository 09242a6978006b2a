"""The AgentRuntime protocol's two runtimes, without a sandbox: OpenClaw's gateway (argv, service,
policy) and its rendered config (golden, the tool policy, what a template cannot change); the
command runtime's turn and `serve`; the lookup by kind. Turns driven over HTTP:
test_agent_drive.py."""

from __future__ import annotations

import json
import re

import pytest

from blueprints.catalog import Catalog
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.runtimes import RUNTIMES, AgentRuntime, ExecTurns, Service, Serving, runtime_for
from blueprints.runtimes.command import CommandRuntime
from blueprints.runtimes.openclaw import CONFIG_FILE, PORT, OpenClawRuntime, render
from blueprints.runtimes.tools import ALWAYS_DENIED, render_tools
from sandbox.compile.podman_spec import AGENT_DIR
from tests.helpers import GOLDEN, assert_golden

SERVING = Serving(context_tokens=32768, on_vllm=False)


def _command_bp(**runtime: object) -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "demo",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["sleep", "infinity"], **runtime},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
            "inference": {"timeout_s": 30},
        }
    )


def test_render_types_whole_placeholders_and_leaves_agent_variables() -> None:
    template = {
        "window": "{{context_tokens}}",
        "primary": "inference/{{model}}",
        "token": "${OPENCLAW_GATEWAY_TOKEN}",
        "list": ["{{ model }}", 3, True],
    }
    out = render(template, {"context_tokens": 32768, "model": "default"})
    assert out == {
        "window": 32768,
        "primary": "inference/default",
        "token": "${OPENCLAW_GATEWAY_TOKEN}",
        "list": ["default", 3, True],
    }


def test_render_refuses_an_unknown_placeholder() -> None:
    with pytest.raises(BlueprintError, match=r"unknown placeholder \{\{modle\}\}"):
        render({"a": "{{modle}}"}, {"model": "x"})


def test_the_lookup_gives_each_kind_its_runtime() -> None:
    catalog = Catalog()
    assert set(RUNTIMES) == {"openclaw", "command"}
    openclaw = runtime_for(catalog.get("openclaw"))
    shell = runtime_for(catalog.get("shell"))
    assert isinstance(openclaw, OpenClawRuntime) and isinstance(shell, CommandRuntime)
    runtimes: list[AgentRuntime] = [openclaw, shell]  # both satisfy the protocol (mypy/pyright)
    assert all(r.workspace == "/home/agent/workspace" for r in runtimes)


@pytest.mark.parametrize("ref", ["openclaw@1.1.0", "openclaw@1.0.0"])
def test_openclaw_config_for_the_shipped_blueprints(ref: str) -> None:
    """Each shipped blueprint's config as the embedded backend gets it (golden): the template
    plus what the gateway needs; and the served context and reply budget on vLLM."""
    runtime = OpenClawRuntime(Catalog().get(ref))
    files = runtime.agent_files(SERVING)
    assert list(files) == [CONFIG_FILE]
    assert_golden(GOLDEN / "agents" / f"{ref.replace('@', '-')}.json", files[CONFIG_FILE])
    config = json.loads(files[CONFIG_FILE])
    assert "{{" not in files[CONFIG_FILE]  # every placeholder filled
    gateway = config["gateway"]
    assert (gateway["port"], gateway["bind"], gateway["mode"]) == (PORT, "loopback", "local")
    assert gateway["auth"] == {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"}
    assert gateway["http"]["endpoints"]["responses"] == {"enabled": True}
    assert config["cron"] == {"enabled": False}
    deny = config["tools"]["deny"]
    assert set(ALWAYS_DENIED) <= set(deny) and "intent" in deny and "cron" not in deny
    assert "sessions_history" not in deny and "allow" not in config["tools"]
    on_vllm = json.loads(runtime.agent_files(Serving(131072, on_vllm=True))[CONFIG_FILE])
    assert on_vllm != config and "131072" in json.dumps(on_vllm) and "4096" in json.dumps(on_vllm)


def test_the_1_0_0_template_keeps_its_own_deny_list() -> None:
    config = json.loads(
        OpenClawRuntime(Catalog().get("openclaw@1.0.0")).agent_files(SERVING)[CONFIG_FILE]
    )
    assert config["tools"]["deny"][:6] == [
        "browser", "canvas", "message", "image_generate", "music_generate", "video_generate",
    ]  # fmt: skip


def _openclaw_bp(agent_config: dict, **tools: list[str]) -> Blueprint:
    doc = Catalog().get("openclaw").model_dump(mode="json")
    return Blueprint.model_validate(doc | {"agent_config": agent_config, "tools": tools})


def _config(bp: Blueprint) -> dict:
    return json.loads(OpenClawRuntime(bp).agent_files(SERVING)[CONFIG_FILE])


def test_the_template_cannot_move_the_gateway_or_turn_cron_on() -> None:
    template = {
        "gateway": {"port": 9999, "bind": "lan", "auth": {"mode": "none"}, "http": {"x": 1}},
        "cron": {"enabled": True, "store": "x"},
    }
    config = _config(_openclaw_bp(template))
    assert config["gateway"]["port"] == PORT and config["gateway"]["bind"] == "loopback"
    assert config["gateway"]["auth"]["mode"] == "token"
    assert config["gateway"]["http"] == {"x": 1, "endpoints": {"responses": {"enabled": True}}}
    assert config["cron"] == {"enabled": False, "store": "x"}
    with pytest.raises(BlueprintError, match=r"agent_config.gateway: a mapping, not str"):
        _config(_openclaw_bp({"gateway": "open"}))
    with pytest.raises(BlueprintError, match=r"agent_config.tools.deny: a list of tool names"):
        _config(_openclaw_bp({"tools": {"deny": "exec"}}))


def test_sessions_history_is_never_denied() -> None:
    """The appliance reads each turn's tool calls through sessions_history (/tools/invoke
    obeys the agent's tool policy): denying it, directly or by a pattern, is refused; a
    group that holds it is denied as its other members; an allowlist gets it added."""
    with pytest.raises(ValueError, match="'sessions_history' cannot be denied: the appliance"):
        _openclaw_bp({}, denied=["sessions_history"])
    for bad in ("sessions_history", "sessions_*", "*"):
        with pytest.raises(BlueprintError, match=f"{re.escape(repr(bad))} denies sessions_h"):
            _config(_openclaw_bp({"tools": {"deny": [bad]}}))
    deny = _config(_openclaw_bp({}, denied=["group:sessions"]))["tools"]["deny"]
    assert "group:sessions" not in deny and "sessions_history" not in deny
    assert {"sessions_spawn", "sessions_send", "subagents"} <= set(deny)
    tools = _config(_openclaw_bp({"tools": {"profile": "coding"}}, allowed=["read"]))["tools"]
    assert tools["allow"] == ["read", "sessions_history"] and "alsoAllow" not in tools
    tools = _config(_openclaw_bp({"tools": {"profile": "minimal"}}))["tools"]
    assert tools["alsoAllow"] == ["sessions_history"] and "allow" not in tools
    with pytest.raises(BlueprintError, match="alsoAllow: OpenClaw takes it or an allowlist"):
        _config(_openclaw_bp({"tools": {"alsoAllow": ["read"]}}, allowed=["exec"]))


def test_self_triggering_tools_cannot_be_allowed() -> None:
    assert "intent" in ALWAYS_DENIED and "intent" in render_tools(None)["deny"]
    with pytest.raises(ValueError, match="'intent' cannot be allowed: the control plane"):
        _openclaw_bp({}, allowed=["intent"])
    assert (
        "node_inference" in _config(_openclaw_bp({}, denied=["node_inference"]))["tools"]["deny"]
    )  # the image's plugin tools are known names


def test_openclaw_runs_its_gateway_with_no_secret_in_argv() -> None:
    """The sandbox's main process is the gateway (golden argv), its env in argv since the
    supervisor gives a runtime no other; the token comes from the runtime env file."""
    bp = Catalog().get("openclaw")
    runtime = OpenClawRuntime(bp)
    argv = runtime.command()
    assert_golden(GOLDEN / "agents" / "openclaw.argv.json", json.dumps(argv, indent=1) + "\n")
    assert argv[0] == "/usr/bin/env" and argv[-3:] == ["openclaw", "gateway", "run"]
    assert not any("TOKEN" in a for a in argv)
    assert runtime.service() == Service(port=PORT, token_env="OPENCLAW_GATEWAY_TOKEN")
    policy = runtime.policy()
    assert policy.process.listen == [PORT] and bp.policy().process.listen == []
    assert AGENT_DIR in policy.filesystem.read_only
    assert AGENT_DIR not in bp.policy().filesystem.read_only  # added by the runtime only
    # Its turns are driven through the gateway: no command per turn.
    assert not isinstance(runtime, ExecTurns)


def test_the_command_runtime() -> None:
    runtime = CommandRuntime(_command_bp())
    assert runtime.command() == ["sleep", "infinity"]
    assert runtime.agent_files(SERVING) is None and isinstance(runtime, ExecTurns)
    assert runtime.policy() == runtime.blueprint.policy()
    assert runtime.turn("hi", "s") is None  # no `turn`: it takes no turns

    runtime = CommandRuntime(_command_bp(turn=["sh", "-c", 'echo "$AGENT_MESSAGE"']))
    turn = runtime.turn("hello; $(reboot)", "run-1")
    assert turn is not None and turn.argv == ["sh", "-c", 'echo "$AGENT_MESSAGE"']
    assert turn.env == {"AGENT_MESSAGE": "hello; $(reboot)", "AGENT_SESSION": "run-1"}
    assert turn.timeout_s == 30
    reply = runtime.read_turn(0, b"hello\n", b"")
    assert reply.ok and reply.text == "hello" and reply.raw is None
    assert not runtime.read_turn(3, b"partial", b"err").ok


@pytest.mark.parametrize(
    ("runtime", "error"),
    [
        ({"kind": "command", "command": ["x"], "turn": []}, "non-empty argv"),
        (
            {"kind": "openclaw", "version": "2026.9.6", "integrity": "sha512-" + "A" * 86 + "==",
             "turn": ["x"]},
            "are for kind: command",
        ),
    ],
)  # fmt: skip
def test_a_turn_command_is_checked(runtime: dict, error: str) -> None:
    doc = _command_bp().model_dump(mode="json") | {"runtime": runtime}
    with pytest.raises(ValueError, match=error):
        Blueprint.model_validate(doc)


def test_an_unset_turn_leaves_the_digest_as_it_was() -> None:
    """Deployments made before `runtime.turn` existed keep their pinned digests (rollback)."""
    assert Catalog().get("shell").digest() == (
        "sha256:be9606f8b0224ff7a2660f328b26302015d8944a60f9664a3e4f664b7af78ed1"
    )
    assert _command_bp(turn=["true"]).digest() != _command_bp().digest()


def test_a_served_command() -> None:
    runtime = CommandRuntime(_command_bp(serve={"port": 8080}))
    assert runtime.service() == Service(port=8080, token_env="AGENT_TOKEN")
    assert runtime.policy().process.listen == [8080]
    assert runtime.turn("hi", "s") is None
    assert CommandRuntime(_command_bp()).service() is None


@pytest.mark.parametrize(
    ("runtime", "error"),
    [
        ({"kind": "command", "command": ["x"], "serve": {"port": 80}}, "greater than or equal"),
        ({"kind": "command", "command": ["x"], "serve": {"port": 70000}}, "less than or equal"),
        ({"kind": "command", "command": ["x"], "serve": {"port": 3128}}, "egress forwarder"),
        ({"kind": "command", "command": ["x"], "serve": {"port": "8080x"}}, "valid integer"),
        ({"kind": "command", "command": ["x"], "serve": {}}, "port\n  Field required"),
        ({"kind": "command", "command": ["x"], "serve": {"port": 8080, "x": 1}}, "Extra inputs"),
        (
            {"kind": "command", "command": ["x"], "turn": ["y"], "serve": {"port": 8080}},
            "give `turn` or `serve`, not both",
        ),
        (
            {"kind": "openclaw", "version": "2026.9.6", "integrity": "sha512-" + "A" * 86 + "==",
             "serve": {"port": 8080}},
            "are for kind: command",
        ),
    ],
)  # fmt: skip
def test_serve_is_checked(runtime: dict, error: str) -> None:
    doc = _command_bp().model_dump(mode="json") | {"runtime": runtime}
    with pytest.raises(ValueError, match=re.escape(error)):
        Blueprint.model_validate(doc)


def test_an_unset_serve_leaves_the_digest_as_it_was() -> None:
    assert "serve" not in _command_bp().canonical()
    served = _command_bp(serve={"port": 8080})
    assert (
        '"serve":{"port":8080}' in served.canonical() and served.digest() != _command_bp().digest()
    )
    assert Blueprint.model_validate_json(served.canonical()) == served
