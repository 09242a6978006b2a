"""Request-target normalisation (RFC 3986 §6.2.2): what the rules match is what goes upstream.

Path rules were matched on the raw path, so `/ok/../admin` passed an allow rule for `/ok/**` and
`/ok//secret` slipped past a deny rule for `/ok/secret/**`, while the origin resolved both to what
the rules were meant to stop. Here the path is put in one canonical form, the rules judge that
form, and that form is what the proxy forwards: the origin never sees a spelling the rules did
not. What has no single meaning across servers is refused (400) instead of guessed:

- percent-escapes of unreserved characters (`%61`, `%2e`, `%7E`) are decoded, the hex of every
  other escape is upper-cased (`%3f` → `%3F`);
- empty segments collapse (`//` → `/`) and dot segments go (`.`, `..`, also percent-encoded),
  never above the root;
- refused: an escaped `/` or `\\` (`%2F`, `%5C`), a raw `\\`, an escaped or raw control
  character (NUL included), a raw non-ASCII byte, a `#`, a malformed escape, a dot segment
  with a `;` parameter (`..;`, which Tomcat reads as `..`), a double-encoded escape (`%25`
  and two hex digits: `%252e` is `.` to a server that decodes twice), a path not starting
  with `/`.

`;parameters` stay in what is forwarded, but deny rules also judge the path without them
(`without_params`): Tomcat, Jetty and Spring route `/ok/secret;x/data` as `/ok/secret/data`.

Escaped non-ASCII (`%C3%A9`, UTF-8) stays as it is: it is unambiguous. The query is checked for
the same raw characters and malformed escapes but is otherwise forwarded untouched (it is data,
not path). Deny rules then compare case-insensitively (ASCII), allow rules case-sensitively
(sandbox/proxy/decide.py): servers that fold case must not serve a denied path.
"""

from __future__ import annotations

import re

from sandbox.proxy.http1 import HttpError

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Visible ASCII but not `\` or `#` (RFC 3986 has neither in a path or query): anything else raw
# (space, controls, DEL, non-ASCII) is refused before any other reading.
_RAW_OK = re.compile(r"[!-\"$-\[\]-~]*")  # with fullmatch: `$` would pass a final "\n"
_REFUSED_ESCAPES = {"2F": "an encoded '/'", "5C": "an encoded '\\'"}
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")  # judged after one decoding pass


def _bad(reason: str) -> HttpError:
    return HttpError(400, f"ambiguous request path: {reason}")


def _check_raw(text: str, what: str) -> None:
    if not _RAW_OK.fullmatch(text):
        bad = next(c for c in text if not _RAW_OK.fullmatch(c))
        raise _bad(f"{what} has the character {bad!r}")


def _escapes(text: str, what: str) -> str:
    """Decode unreserved escapes, upper-case the rest; refuse malformed or ambiguous ones."""
    if "%" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        hexpair = text[i + 1 : i + 3]
        if len(hexpair) != 2 or not set(hexpair) <= _HEX:
            raise _bad(f"{what} has a malformed percent-escape")
        hexpair = hexpair.upper()
        value = int(hexpair, 16)
        if hexpair in _REFUSED_ESCAPES:
            raise _bad(f"{what} has {_REFUSED_ESCAPES[hexpair]} ({text[i : i + 3]})")
        if value < 0x20 or value == 0x7F:
            raise _bad(f"{what} has an encoded control character (%{hexpair})")
        char = chr(value)
        out.append(char if char in _UNRESERVED else f"%{hexpair}")
        i += 3
    return "".join(out)


def normalise_path(path: str) -> str:
    """The canonical form of an absolute path (no query), or HttpError(400)."""
    _check_raw(path, "the path")
    if not path.startswith("/"):
        raise _bad("the path must start with '/'")
    decoded = _escapes(path, "the path")
    if double := _DOUBLE.search(decoded):
        raise _bad(f"a double-encoded escape ({double.group()})")
    segments = decoded.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        if seg.split(";", 1)[0] in (".", "..") and ";" in seg:
            raise _bad(f"a dot segment with a parameter ({seg!r})")
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    # A trailing slash (or a trailing dot segment, which names a directory) is kept.
    trailing = bool(out) and segments[-1] in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


def without_params(path: str) -> str:
    """A normalised path with each segment's `;parameters` removed, as Tomcat, Jetty and Spring
    route it (empty segments that leaves collapse; a trailing slash stays)."""
    if ";" not in path:
        return path
    segments = [seg.split(";", 1)[0] for seg in path.split("/")[1:]]
    kept = [seg for seg in segments if seg]
    return "/" + "/".join(kept) + ("/" if kept and segments[-1] == "" else "")


def normalise_target(target: str) -> str:
    """An origin-form target (`/path?query`) with its path normalised and its query checked."""
    path, sep, query = target.partition("?")
    normal = normalise_path(path)
    if sep:
        _check_raw(query, "the query")
        if any(len(h) < 2 or not set(h[:2]) <= _HEX for h in query.split("%")[1:]):
            raise _bad("the query has a malformed percent-escape")
        return f"{normal}?{query}"  # data, not path: forwarded as the client sent it
    return normal
