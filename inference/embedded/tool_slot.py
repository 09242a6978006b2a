"""Whether the model's chat template shows `tools` to the model, and saying so when it cannot.

A template without a tool slot renders a request's tools as nothing: the model never sees them
and the caller would never know. So the server asks once per loaded model (a tiny conversation
rendered with and without a dummy tool: identical text = no slot) and, for each request that
carries tools it cannot show, answers with the `x-appliance-notice` header and logs it (a warning
the first time, then at debug level: an agent sends tools with every turn).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from inference.notices import header_value, tools_ignored

log = logging.getLogger("inference.embedded")

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "appliance_tool_slot_probe",
        "description": "Probe: does the template render tools?",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
    },
}
# Some templates place tools in the system turn only when there is one: try both shapes.
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
)


def has_tool_slot(tokenizer: Any) -> bool | None:
    """True when the chat template renders tools, False when it renders them as nothing,
    None when that cannot be told (no template, or it fails on the probe)."""
    answer: bool | None = None
    for messages in _PROBE_CONVERSATIONS:
        try:
            plain = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            with_tool = tokenizer.apply_chat_template(
                messages, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # no template, or one that refuses this shape: try the next
            continue
        if plain != with_tool:
            return True
        answer = False
    return answer


class ToolSlot:
    """One loaded model's answer (`slot`), and the notice for requests whose tools it drops."""

    def __init__(self, model: str, tokenizer: Any) -> None:
        self.model = model
        self.slot = has_tool_slot(tokenizer)
        self.notice = header_value(tools_ignored(model))
        self._warned = False
        self._lock = threading.Lock()

    def notice_for(self, tools: list[Any] | None) -> str | None:
        """The notice for a request carrying `tools`, logged; None when nothing is dropped."""
        if not tools or self.slot is not False:
            return None
        with self._lock:  # exactly one warning per process, however many requests race
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "embedded: %s (requests' tools are not shown to the model; "
                "further ones are logged at debug level)",
                self.notice,
            )
        else:
            log.debug("embedded: %s (%d tools)", self.notice, len(tools))
        return self.notice
