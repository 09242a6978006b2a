"""OpenClaw, always on (REFERENCE.md §8-9): `openclaw gateway run` is the sandbox's main process,
kept up by the supervisor, and each turn is one `POST /v1/responses` to it (blueprints/runtimes/
responses.py) through the agent socket, in a session kept by its key.

Its config is the blueprint's `agent_config` template rendered for the served model, plus what
the appliance needs from it (the gateway on loopback port 18789 with its token from the
environment, the OpenResponses endpoint on, OpenClaw's own cron off, the blueprint's tool policy
with the self-scheduling tools always denied), mounted read-only.

The turn's tool calls are not in the response: they are read after it from the session's history
(`sessions_history` through `POST /tools/invoke`), for the host transcript and the denied-tool
alarm (`agent.tool_denied`). That history is OpenClaw's, in the agent's writable state dir
(OPENCLAW_STATE_DIR, in its home): the agent's own tools (exec, write) can rewrite it before it
is read. So the transcript's tool calls are the calls as the runtime reports them, not a
tamper-proof account, and the alarm's limit is that: it fires for a denied call still in the
history when it is read; an agent that rewrites its history in the same turn can hide one. What
stops a denied tool is OpenClaw's tool policy (rendered read-only) and the sandbox (Landlock,
the egress proxy), not the alarm.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from fnmatch import fnmatchcase
from typing import Any

import httpx

from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.runtimes import WORKSPACE, Finished, Service, Serving, ToolCall, TurnEvent
from blueprints.runtimes.responses import (
    MAX_REPLY_CHARS,
    READY_TIMEOUT_S,
    ProtocolError,
    Result,
    bad_session,
    http_error,
    one_line,
    read_bounded,
    stream_turn,
    wait_ready,
)
from blueprints.runtimes.tools import (
    NEVER_DENIED,
    NEVER_DENIED_REASON,
    OPENCLAW_GROUPS,
    canonical_tool,
    keep_readable,
    render_tools,
)
from sandbox.compile.podman_spec import AGENT_DIR
from sandbox.policy import Policy

log = logging.getLogger(__name__)

CONFIG_FILE = "openclaw.json"
PORT = 18789  # the gateway's HTTP/WebSocket port, on the sandbox's loopback
TOKEN_ENV = "OPENCLAW_GATEWAY_TOKEN"  # from the runtime env file the supervisor reads, never argv
MODEL = "openclaw/main"  # OpenResponses `model`: OpenClaw's agent `main`
SESSION_HEADER = "x-openclaw-session-key"  # OpenClaw keeps it as agent:main:<session>
# Offline, no self-update or respawn, no discovery (REFERENCE.md §8). No secret in here: it is
# the gateway's argv (`env K=V ...`: the supervisor gives a runtime no other environment).
ENV = {
    "OPENCLAW_OFFLINE": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_SKIP_CHANNELS": "1",
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "OPENCLAW_CONFIG_READONLY": "1",
    "DO_NOT_TRACK": "1",
    "OPENCLAW_PROXY_URL": "http://127.0.0.1:3128",
    "OPENCLAW_CONFIG_PATH": f"{AGENT_DIR}/{CONFIG_FILE}",
    "OPENCLAW_STATE_DIR": "/home/agent/.openclaw",
}
# Profiles whose tools include sessions_history (docs/gateway/config-tools/tool-policy.md).
PROFILES_WITH_HISTORY = frozenset({"coding", "messaging", "full"})
MAX_TOOL_CALLS = 200  # per turn
UNSTREAMABLE = "cannot be represented as an append-only response stream"  # OpenClaw's error
# What OpenClaw answers a call to a tool its policy denies (seen on 2026.9.6).
_DENIED_RESULT = re.compile(r"Tool \S{1,100} not found|Tool not available|Unknown tool id")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def render(template: Any, values: dict[str, Any]) -> Any:
    """Fill `{{name}}` placeholders; a string that is only a placeholder takes the value's type
    (so `contextWindow: "{{context_tokens}}"` becomes a number). `${VAR}` is left to the agent."""
    if isinstance(template, dict):
        return {k: render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, values) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return values[_known(whole.group(1), values)]
    return _PLACEHOLDER.sub(lambda m: str(values[_known(m.group(1), values)]), template)


def _known(name: str, values: dict[str, Any]) -> str:
    if name not in values:
        known = ", ".join(sorted(values))
        raise BlueprintError(f"agent_config: unknown placeholder {{{{{name}}}}} (known: {known})")
    return name


def session_key(session: str) -> str:
    return f"agent:main:{session}"


def _section(node: dict[str, Any], *path: str) -> dict[str, Any]:
    """node[path...], made a dict where it is missing (a non-dict there is a template error)."""
    for depth, key in enumerate(path):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise BlueprintError(f"agent_config.{where}: a mapping, not {type(child).__name__}")
        node = child
    return node


def _names(tools: dict[str, Any], key: str) -> list[str]:
    names = tools.get(key, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BlueprintError(f"agent_config.tools.{key}: a list of tool names")
    return names


def tool_policy(template_tools: Any, blueprint_tools: Any) -> dict[str, list[str]]:
    """OpenClaw's tools.allow/deny: the template's lists and the blueprint's `tools:` section
    (render_tools: self-scheduling tools always denied), sessions_history kept reachable."""
    tools = template_tools if isinstance(template_tools, dict) else {}
    rendered = render_tools(blueprint_tools)
    deny = keep_readable(list(dict.fromkeys([*_names(tools, "deny"), *rendered["deny"]])))
    for name in deny:
        if fnmatchcase(NEVER_DENIED, canonical_tool(name.lower())):
            raise BlueprintError(
                f"agent_config.tools.deny: {name!r} denies {NEVER_DENIED}: {NEVER_DENIED_REASON}"
            )
    allow = list(dict.fromkeys([*_names(tools, "allow"), *rendered["allow"]]))
    if allow:  # an allowlist: sessions_history on it too
        allow = list(dict.fromkeys([*allow, NEVER_DENIED]))
    return {"allow": allow, "deny": deny}


def runtime_config(config: dict[str, Any], bp: Blueprint) -> dict[str, Any]:
    """The rendered template plus what the appliance needs from OpenClaw (set, not defaulted:
    a template cannot move the port, drop the token, or turn OpenClaw's own cron on)."""
    gateway = _section(config, "gateway")
    gateway.update(mode="local", bind="loopback", port=PORT)
    gateway["auth"] = {"mode": "token", "token": "${" + TOKEN_ENV + "}"}
    _section(gateway, "http", "endpoints", "responses")["enabled"] = True
    _section(config, "cron")["enabled"] = False  # the control plane schedules agents
    tools = _section(config, "tools")
    policy = tool_policy(tools, bp.tools)
    tools["deny"] = policy["deny"]
    if policy["allow"]:
        if "alsoAllow" in tools:
            raise BlueprintError(
                "agent_config.tools.alsoAllow: OpenClaw takes it or an allowlist (tools.allowed)"
            )
        tools["allow"] = policy["allow"]
    elif tools.get("profile", "full") not in PROFILES_WITH_HISTORY:
        tools["alsoAllow"] = list(dict.fromkeys([*_names(tools, "alsoAllow"), NEVER_DENIED]))
    return config


class OpenClawRuntime:
    workspace = WORKSPACE
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def policy(self) -> Policy:
        """The blueprint's policy with the config directory read-only to the agent and the
        gateway's port open to bind on loopback."""
        policy = self.blueprint.policy()
        fs = policy.filesystem.model_copy(
            update={"read_only": [*policy.filesystem.read_only, AGENT_DIR]}
        )
        listen = sorted({*policy.process.listen, PORT})
        process = policy.process.model_copy(update={"listen": listen})
        return policy.model_copy(update={"filesystem": fs, "process": process})

    def command(self) -> list[str]:
        env = [f"{key}={value}" for key, value in ENV.items()]
        return ["/usr/bin/env", *env, "openclaw", "gateway", "run"]

    def service(self) -> Service:
        return Service(port=PORT, token_env=TOKEN_ENV)

    def agent_files(self, serving: Serving) -> dict[str, str]:
        inference = self.blueprint.inference
        values = {
            "model": inference.model,
            "timeout_s": int(inference.timeout_s),
            "context_tokens": inference.context_tokens or serving.context_tokens,
            "max_tokens": inference.max_output_tokens or (4096 if serving.on_vllm else 256),
            "workspace": WORKSPACE,
        }
        config = runtime_config(render(self.blueprint.agent_config, values), self.blueprint)
        return {CONFIG_FILE: json.dumps(config, indent=2) + "\n"}

    def drive(
        self, http: httpx.Client, token: str, message: str, session: str
    ) -> Iterator[TurnEvent]:
        if (error := bad_session(session)) is not None:
            yield Finished(ok=False, text="", error=error)
            return
        if (error := wait_ready(http, self.service().ready_path, self.ready_timeout_s)) is not None:
            yield Finished(ok=False, text="", error=error)
            return
        body = {"model": MODEL, "input": message, "stream": True}
        result = yield from stream_turn(http, token, body, {SESSION_HEADER: session})
        if result.response_id is None:
            yield result.finished(session_key(session))
            return
        try:  # a failed turn's calls count too (alarms)
            messages = self.history(http, token, session)
        except (ProtocolError, httpx.HTTPError, OSError) as exc:
            reason = one_line(f"{type(exc).__name__}: {exc}")
            log.warning("tool calls of %s unread: %s", result.response_id, reason)
            result.raw = {**(result.raw or {}), "appliance_tool_calls_error": reason}
        else:
            policy = tool_policy(self.blueprint.agent_config.get("tools"), self.blueprint.tools)
            yield from calls_of_run(messages, result.response_id, _expand(policy["deny"]))
            if not result.ok and UNSTREAMABLE in (result.error or ""):
                _reply_from_history(result, messages, result.response_id)
        yield result.finished(session_key(session))

    def history(self, http: httpx.Client, token: str, session: str) -> list[Any]:
        """The session's messages, through sessions_history."""
        with http.stream(
            "POST",
            "/tools/invoke",
            json={
                "tool": NEVER_DENIED,
                "args": {"sessionKey": session_key(session), "includeTools": True},
            },
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status_code != 200:
                raise ProtocolError(f"{NEVER_DENIED}: {http_error(response)}")
            try:
                body = read_bounded(response)
            except ProtocolError as exc:
                raise ProtocolError(f"{NEVER_DENIED}: {exc}") from None
        try:
            payload = json.loads(body)
            messages = payload["result"]["details"]["messages"]
        except (ValueError, TypeError, KeyError):
            raise ProtocolError(f"{NEVER_DENIED}: not the history it returns") from None
        if not isinstance(messages, list):
            raise ProtocolError(f"{NEVER_DENIED}: its messages are not a list")
        return messages


def _reply_from_history(result: Result, messages: list[Any], run_id: str) -> None:
    """OpenClaw fails a streamed turn whose final reply is not the text it streamed plus more (it
    rewrote the start, e.g. dropped a timestamp the model echoed) after the run has completed:
    the turn stands, with its reply read from the history."""
    if (text := reply_of_run(messages, run_id)) is None:
        return
    result.ok, result.text, result.error = True, text, None
    result.raw = {**(result.raw or {}), "appliance_reply_from_history": True}


def _of_run(message: Any, run_id: str) -> bool:
    meta = message.get("__openclaw") if isinstance(message, dict) else None
    return isinstance(meta, dict) and meta.get("runId") == run_id


def reply_of_run(messages: list[Any], run_id: str) -> str | None:
    """The text of run `run_id`'s last assistant message with text in `messages`, if any."""
    for message in reversed(messages):
        if not _of_run(message, run_id) or message.get("role") != "assistant":
            continue
        parts = message.get("content") if isinstance(message.get("content"), list) else []
        texts = [
            p["text"]
            for p in parts
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        if texts:
            return "".join(texts)[:MAX_REPLY_CHARS]
    return None


def _expand(names: list[str]) -> list[str]:
    """Deny entries as lowercase tool names and patterns, groups written out."""
    out: list[str] = []
    for name in names:
        name = canonical_tool(name.lower())
        out += sorted(OPENCLAW_GROUPS.get(name) or {name})
    return out


def calls_of_run(messages: list[Any], run_id: str, deny: list[str]) -> list[ToolCall]:
    """ToolCall per call in `messages` (OpenClaw's history) made by run `run_id`: the assistant's
    toolCall parts and the toolResults (a call to a tool OpenClaw does not offer has only its
    result). A call through the meta-tool `tool_call` is named by the tool it asked for."""
    calls: dict[str, dict[str, Any]] = {}
    for message in messages:
        if not _of_run(message, run_id):
            continue
        if message.get("role") == "assistant" and isinstance(message.get("content"), list):
            for part in message["content"]:
                if isinstance(part, dict) and part.get("type") == "toolCall":
                    call_id = str(part.get("id") or f"#{len(calls)}")
                    calls[call_id] = {"name": part.get("name"), "args": part.get("arguments")}
        elif message.get("role") == "toolResult":
            call_id = str(message.get("toolCallId") or f"#{len(calls)}")
            call = calls.setdefault(call_id, {"name": message.get("toolName"), "args": None})
            call["result"] = _result_text(message)
            call["error"] = message.get("isError") is True
    return [_tool_call(call, deny) for call in list(calls.values())[:MAX_TOOL_CALLS]]


def _result_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    texts = [p.get("text") if isinstance(p, dict) else p for p in parts]
    return " ".join(t for t in texts if isinstance(t, str))[:1000]


def _tool_call(call: dict[str, Any], deny: list[str]) -> ToolCall:
    name, args = call.get("name"), call.get("args")
    if name == "tool_call" and isinstance(args, dict) and isinstance(args.get("id"), str):
        name = args["id"]
    name = one_line(name, 100) if isinstance(name, str) and name.strip() else "(unnamed)"
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    canonical = canonical_tool(name.lower())
    refused = (call.get("error") or "Unknown tool id" in call.get("result", "")) and bool(
        _DENIED_RESULT.search(call.get("result", ""))
    )
    denied = refused or any(fnmatchcase(canonical, pattern) for pattern in deny)
    return ToolCall(name=name, arguments=arguments if args is not None else "", denied=denied)
