"""Just enough of a Containerfile parser to read back what a recipe declares: its global ARG
defaults, its stages' FROM, and the final stage's ENV, USER, EXPOSE, HEALTHCHECK, ENTRYPOINT
and CMD. The builder takes the base image's default from here and the tests compare the
image's run configuration with the planner's golden argv, so the file stays the one source.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the line, continuations joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str  # FROM's image reference, ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        """Every `ENV KEY=VALUE` of this stage, in order (the `ENV KEY VALUE` form too)."""
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            words = shlex.split(ins.args)
            if words and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def exec_form(self, keyword: str) -> list[str] | None:
        """A JSON-array ENTRYPOINT/CMD (None when absent; shell form is refused)."""
        ins = self.last(keyword)
        if ins is None:
            return None
        return _json_array(ins)


@dataclass
class Containerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def healthcheck(self) -> tuple[dict[str, str], list[str]] | None:
        """The final stage's HEALTHCHECK: (its --options, the CMD in exec form)."""
        ins = self.final.last("HEALTHCHECK")
        if ins is None:
            return None
        options: dict[str, str] = {}
        rest = ins.args
        while rest.startswith("--"):
            opt, _, rest = rest.partition(" ")
            key, _, value = opt[2:].partition("=")
            options[key] = value
            rest = rest.lstrip()
        if not rest.startswith("CMD "):
            raise ValueError(f"line {ins.line}: HEALTHCHECK without CMD")
        return options, _json_array(Instruction("CMD", rest[4:].strip(), ins.line))


def _json_array(ins: Instruction) -> list[str]:
    try:
        value = json.loads(ins.args)
    except ValueError:
        raise ValueError(f"line {ins.line}: {ins.keyword} is not in exec (JSON) form") from None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"line {ins.line}: {ins.keyword} is not a JSON array of strings")
    return value


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, instruction text) with `\\` continuations joined and comments dropped."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(p for p in buf if p)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return _VAR.sub(lambda m: args.get(m.group(1) or m.group(2), ""), text)


def parse(text: str) -> Containerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in _logical_lines(text):
        keyword, _, rest = content.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=substitute(words[0], args), name=name))
            continue
        if not stages:
            raise ValueError(f"line {line}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, rest, line))
    if not stages:
        raise ValueError("no FROM")
    return Containerfile(args=args, stages=stages)


def read(path: Path) -> Containerfile:
    return parse(path.read_text(encoding="utf-8"))
