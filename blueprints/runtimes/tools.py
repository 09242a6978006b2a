"""Tools as policy: the tool names each runtime knows, the blueprint's `tools:` checked against
them, and the allow/deny lists a runtime adapter renders into its own config.

OpenClaw's names are data taken from OpenClaw 2026.9.6 as installed in the openclaw image:
`dist/tool-catalog-*.mjs` (CORE_TOOL_DEFINITIONS: each tool's `sectionId` makes `group:<section>`,
and `includeInOpenClawGroup` makes `group:openclaw`), `dist/tool-policy-shared-*.mjs`
(TOOL_NAME_ALIASES) and docs/gateway/config-tools/tool-policy.md ("Tool groups",
`group:plugins`, `bundle-mcp`). A new OpenClaw version means re-reading those files.

Some tools let an agent schedule or reconfigure itself (OpenClaw's `group:automation`:
`automations` alias `cron`, `gateway`, `plugins`, `openclaw`, `heartbeat_respond`; the
memory-core plugin's `intent`). The control plane schedules agents; agents never schedule
themselves: those are always denied, and a blueprint that allows one is invalid. One tool is
never denied: `sessions_history`, through which the appliance reads each turn's tool calls.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blueprints.model import Tools

_OPENCLAW_SECTIONS: dict[str, tuple[str, ...]] = {
    "fs": ("ls", "read", "write", "edit", "apply_patch"),
    "runtime": ("exec", "process", "code_execution", "secrets"),
    "web": ("web_search", "web_fetch", "x_search"),
    "memory": ("memory_search", "memory_get"),
    "sessions": (
        "sessions",
        "sessions_list",
        "sessions_history",
        "sessions_search",
        "conversations_list",
        "conversations_send",
        "conversations_turn",
        "sessions_send",
        "sessions_spawn",
        "github_identity_status",
        "github_publish",
        "agents_wait",
        "sessions_yield",
        "subagents",
        "session_status",
        "suggest_task",
        "dismiss_task",
    ),
    "ui": (
        "browser",
        "screen",
        "theme",
        "dashboard",
        "terminal",
        "portal",
        "canvas",
        "show_widget",
    ),
    "messaging": ("message",),
    "automation": ("heartbeat_respond", "automations", "gateway", "plugins", "openclaw"),
    "nodes": ("nodes", "computer", "mobile_ui"),
    "agents": (
        "agents_list",
        "get_goal",
        "create_goal",
        "update_goal",
        "progress_card",
        "ask_user",
        "skill_workshop",
    ),
    "media": ("view_image", "image_generate", "music_generate", "video_generate", "tts", "pdf"),
}
# Every built-in tool but the file and shell ones (and canvas), as OpenClaw computes it.
_NOT_IN_OPENCLAW_GROUP = frozenset(
    {"ls", "read", "write", "edit", "apply_patch", "exec", "process", "canvas"}
)

OPENCLAW_TOOLS: frozenset[str] = frozenset(t for ts in _OPENCLAW_SECTIONS.values() for t in ts)
OPENCLAW_GROUPS: dict[str, frozenset[str]] = {
    **{f"group:{section}": frozenset(ts) for section, ts in _OPENCLAW_SECTIONS.items()},
    "group:openclaw": OPENCLAW_TOOLS - _NOT_IN_OPENCLAW_GROUP,
    "group:plugins": frozenset(),  # tools of loaded plugins: none are known ahead of time
}
# Names OpenClaw accepts for others (its TOOL_NAME_ALIASES); rendered as the tool they name.
OPENCLAW_ALIASES: dict[str, str] = {
    "bash": "exec",
    "apply-patch": "apply_patch",
    "cron": "automations",
}
# Plugin ids OpenClaw takes in allow/deny lists (configured MCP servers' tools).
OPENCLAW_PLUGIN_IDS: frozenset[str] = frozenset({"bundle-mcp"})
# Tools of the plugins the openclaw image loads (its `tools.catalog`): memory-core's `intent`
# keeps standing, event-triggered intents, i.e. an agent that triggers itself.
OPENCLAW_PLUGIN_TOOLS: dict[str, tuple[str, ...]] = {
    "memory-core": ("intent",),
    "file-transfer": ("dir_fetch", "dir_list", "file_fetch", "file_write"),
    "ollama": ("node_inference",),
    "talk-voice": ("talk_voice",),
}

# Tools that let an agent schedule or reconfigure itself: denied in every rendered policy.
SELF_CONTROL_GROUP = "group:automation"
SELF_CONTROL_TOOLS: tuple[str, ...] = (*_OPENCLAW_SECTIONS["automation"], "intent")
ALWAYS_DENIED: tuple[str, ...] = (SELF_CONTROL_GROUP, *SELF_CONTROL_TOOLS)
SELF_CONTROL_REASON = "the control plane schedules agents; agents never schedule themselves"
# The appliance reads each turn's tool calls through this tool (OpenClaw's /tools/invoke obeys
# the agent's tool policy): a policy that denies it would hide them from the host transcript.
NEVER_DENIED = "sessions_history"
NEVER_DENIED_REASON = "the appliance reads each turn's tool calls through it"

# What each runtime kind knows (a runtime without tool policy knows none).
KNOWN_NAMES: dict[str, frozenset[str]] = {
    "openclaw": OPENCLAW_TOOLS
    | set(OPENCLAW_GROUPS)
    | set(OPENCLAW_ALIASES)
    | OPENCLAW_PLUGIN_IDS
    | {t for ts in OPENCLAW_PLUGIN_TOOLS.values() for t in ts},
    "command": frozenset(),
}
MAX_NAME = 64


def canonical_tool(name: str) -> str:
    """The tool an alias stands for (`cron` -> `automations`); other names unchanged."""
    return OPENCLAW_ALIASES.get(name, name)


def _hint(name: str, known: frozenset[str]) -> str:
    if len(name) > MAX_NAME:
        return ""
    if f"group:{name}" in known:
        return f" (a group is written `group:{name}`)"
    close = difflib.get_close_matches(name.lower(), sorted(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_tool_name(name: str, *, allowed: bool, kind: str | None = None) -> str:
    """`name` if `kind` (default: any runtime) knows it and, in an allow list, it is not one
    that lets the agent schedule or reconfigure itself; else ValueError saying why."""
    known = KNOWN_NAMES.get(kind, frozenset()) if kind else frozenset().union(*KNOWN_NAMES.values())
    if name not in known:
        shown = repr(name if len(name) <= MAX_NAME else name[:MAX_NAME] + "…")
        where = f"{kind} " if kind else ""
        raise ValueError(f"unknown {where}tool {shown}{_hint(name, known)}")
    if allowed and (name == SELF_CONTROL_GROUP or canonical_tool(name) in SELF_CONTROL_TOOLS):
        raise ValueError(f"{name!r} cannot be allowed: {SELF_CONTROL_REASON}")
    if not allowed and name == NEVER_DENIED:
        raise ValueError(f"{name!r} cannot be denied: {NEVER_DENIED_REASON}")
    return name


def check_tools(kind: str, tools: Tools) -> None:
    """Every name in `tools` is one runtime `kind` knows (ValueError otherwise)."""
    names = [*tools.allowed, *tools.denied]
    if names and not KNOWN_NAMES.get(kind):
        raise ValueError(f"runtime kind {kind!r} has no tool policy: leave `tools` out")
    for name in names:
        check_tool_name(name, allowed=name in tools.allowed, kind=kind)


def keep_readable(deny: list[str]) -> list[str]:
    """`deny` with each group that holds `sessions_history` (group:sessions, group:openclaw)
    written out as its other members, so that the group's other tools stay denied and the
    turn's tool calls stay readable (in OpenClaw, deny wins over any allow)."""
    out: list[str] = []
    for name in deny:
        members = OPENCLAW_GROUPS.get(name, frozenset())
        if NEVER_DENIED in members:
            out += sorted(members - {NEVER_DENIED})
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def render_tools(tools: Tools | None) -> dict[str, list[str]]:
    """The runtime's allow/deny lists: aliases resolved, each name once, and the tools that let
    an agent schedule or reconfigure itself always denied (`sessions_history` never is: see
    keep_readable). An empty `allow` means no allowlist beyond the runtime's own default
    (leave the key out of its config)."""
    allowed = [canonical_tool(n) for n in tools.allowed] if tools else []
    denied = [canonical_tool(n) for n in tools.denied] if tools else []
    return {
        "allow": list(dict.fromkeys(allowed)),
        "deny": keep_readable(list(dict.fromkeys([*denied, *ALWAYS_DENIED]))),
    }
