"""chat_template_kwargs: only the served templates' own switches pass, in the gateway's check and
in the embedded engine itself (a request that reaches it directly, e.g. from the host)."""

from __future__ import annotations

from typing import Any

import pytest

from inference import template_kwargs
from inference.embedded.engine import Engine
from inference.embedded.errors import InvalidRequest


class _Tokenizer:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[Any], **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return "rendered"


class _Engine:
    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()


HOSTILE: list[Any] = [
    {"chat_template": "{% for i in range(9999) %}{% for j in range(9999) %}x{% endfor %}"},
    {"tools": [{"x": 1}]},
    {"add_generation_prompt": False},
    {"enable_thinking": "yes"},
    {"reasoning_effort": "x" * 1000},
    ["enable_thinking"],
]


@pytest.mark.parametrize("kwargs", HOSTILE)
def test_the_embedded_engine_refuses_template_kwargs_outside_the_allowlist(kwargs: Any) -> None:
    engine = _Engine()
    with pytest.raises(InvalidRequest, match="chat_template_kwargs"):
        Engine.chat_text(engine, [{"role": "user", "content": "hi"}], chat_template_kwargs=kwargs)  # type: ignore[arg-type]
    assert engine.tokenizer.calls == []  # the template never ran


def test_the_embedded_engine_passes_the_models_own_switches() -> None:
    engine = _Engine()
    kwargs = {"enable_thinking": False, "reasoning_effort": "low"}
    text = Engine.chat_text(
        engine, [{"role": "user", "content": "hi"}], chat_template_kwargs=kwargs
    )  # type: ignore[arg-type]
    assert text == "rendered"
    assert engine.tokenizer.calls[0]["enable_thinking"] is False


@pytest.mark.parametrize("kwargs", HOSTILE)
def test_the_shared_check_names_the_problem(kwargs: Any) -> None:
    assert (template_kwargs.problem(kwargs) or "").startswith("chat_template_kwargs")


def test_the_shared_check_passes_nothing_and_the_switches() -> None:
    assert template_kwargs.problem(None) is None
    assert template_kwargs.problem({}) is None
    assert template_kwargs.problem({"thinking": True, "reasoning_effort": "high"}) is None
