"""The request-target normaliser (sandbox/proxy/paths.py) and the rule matching built on it."""

from __future__ import annotations

import pytest

from sandbox.policy import Network
from sandbox.proxy.decide import evaluate
from sandbox.proxy.http1 import HttpError
from sandbox.proxy.paths import normalise_path, normalise_target

NORMAL = [
    ("/", "/"),
    ("/a", "/a"),
    ("/a/", "/a/"),
    ("//", "/"),
    ("/a//b", "/a/b"),
    ("///a///b///", "/a/b/"),
    ("/./a", "/a"),
    ("/a/.", "/a/"),
    ("/a/./b", "/a/b"),
    ("/a/../b", "/b"),
    ("/a/b/..", "/a/"),
    ("/..", "/"),
    ("/../../a", "/a"),  # never above the root
    ("/a/%2e%2e/b", "/b"),  # encoded dots are dots (RFC 3986 §6.2.2.2, then §6.2.2.3)
    ("/a/%2E%2E/b", "/b"),
    ("/a/.%2E/b", "/b"),
    ("/a/%2e/b", "/a/b"),
    ("/a/..%2e/b", "/a/.../b"),  # three dots: a name, not a dot segment
    ("/%7Euser/%61bc", "/~user/abc"),  # unreserved escapes decoded
    ("/a%2db%5fc%2Ed", "/a-b_c.d"),
    ("/a%3fb", "/a%3Fb"),  # reserved escapes kept, hex upper-cased
    ("/a%2ab%3a", "/a%2Ab%3A"),
    ("/caf%c3%a9", "/caf%C3%A9"),  # escaped UTF-8 is unambiguous: kept
    ("/a;b=c/d", "/a;b=c/d"),
    ("/a/...", "/a/..."),
    ("/a/.b/..c", "/a/.b/..c"),
]


@pytest.mark.parametrize(("raw", "normal"), NORMAL)
def test_normal_forms(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal  # idempotent


REFUSED = [
    ("", "start with '/'"),
    ("a/b", "start with '/'"),
    ("/a%2fb", "encoded '/'"),
    ("/a%2Fb", "encoded '/'"),
    ("/a%5cb", "encoded '\\'"),
    ("/a\\b", "character '\\\\'"),
    ("/a%00", "control"),
    ("/a%0a", "control"),
    ("/a%7f", "control"),
    ("/a\x00", "character"),
    ("/a\tb", "character"),
    ("/a b", "character"),
    ("/a\x7f", "character"),
    ("/caf\xe9", "character"),
    ("/a#b", "character '#'"),
    ("/a%", "malformed"),
    ("/a%2", "malformed"),
    ("/a%zz", "malformed"),
    ("/a%+1", "malformed"),
    ("/a/..;/b", "dot segment with a parameter"),
    ("/a/.;x/b", "dot segment with a parameter"),
    ("/a/%2e%2e;/b", "dot segment with a parameter"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED, ids=[ascii(r) for r, _ in REFUSED])
def test_ambiguous_paths_are_refused(raw: str, why: str) -> None:
    with pytest.raises(HttpError) as err:
        normalise_path(raw)
    assert err.value.status == 400 and why in err.value.reason


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/../b?x=1", "/b?x=1"),
        ("/a?x=%2f&y=../z", "/a?x=%2f&y=../z"),  # the query is data: forwarded untouched
        ("/a?", "/a?"),
        ("/a?%7e", "/a?%7e"),
    ],
)
def test_targets_keep_their_query(raw: str, normal: str) -> None:
    assert normalise_target(raw) == normal


@pytest.mark.parametrize("raw", ["/a?x=%zz", "/a?x y", "/a?x\\y", "/a?#", "/a?\xe9"])
def test_bad_queries_are_refused(raw: str) -> None:
    with pytest.raises(HttpError):
        normalise_target(raw)


NET = Network.model_validate(
    {
        "allow": [{"host": "h.test", "ports": [80], "paths": ["/ok/**", "/Mixed/*"]}],
        "deny": [{"host": "h.test", "ports": [80], "paths": ["/ok/secret/**", "/ok/Admin"]}],
    }
)


@pytest.mark.parametrize(
    ("path", "verdict"),
    [
        ("/ok/x", "allow"),
        ("/ok/secret/x", "deny"),
        ("/ok/SECRET/x", "deny"),  # deny: ASCII case-insensitive
        ("/ok/sEcReT/x", "deny"),
        ("/ok/admin", "deny"),  # the deny glob's own case does not matter either
        ("/ok/ADMIN", "deny"),
        ("/OK/x", "deny"),  # allow: case-sensitive (not allowed, so refused)
        ("/Mixed/x", "allow"),
        ("/mixed/x", "deny"),
    ],
)
def test_deny_ignores_case_allow_does_not(path: str, verdict: str) -> None:
    assert evaluate(NET, "h.test", 80, "GET", path).verdict == verdict


@pytest.mark.parametrize("raw", ["/a\n", "/a\n\n", "\n", "\n\n", "/a?x\n", "/a?\n\n"])
def test_a_trailing_newline_is_refused_with_a_400(raw: str) -> None:
    """`$` matches before a final newline, and `next(...)` found no bad character in "\\n\\n"
    (StopIteration escaped): both must be a plain 400."""
    with pytest.raises(HttpError) as err:
        normalise_target(raw)
    assert err.value.status == 400 and "'\\n'" in err.value.reason, err.value.reason


# Tomcat, Jetty and Spring drop each segment's `;parameters` before routing: a deny rule must
# match the path as they read it. Allow rules keep matching the path as sent (stricter).
@pytest.mark.parametrize(
    ("path", "verdict"),
    [
        ("/ok/secret;/data", "deny"),
        ("/ok/secret;x/data", "deny"),
        ("/ok/secret/;", "deny"),
        ("/ok/secret/x;", "deny"),
        ("/ok/secret;jsessionid=1/x", "deny"),
        ("/ok/SECRET;a=b/x", "deny"),
        ("/ok;x/secret/data", "deny"),
        ("/ok/secret%3Bx/data", "allow"),  # an escaped ';' is data, not a parameter
        ("/ok/admin;", "deny"),
        ("/ok/secrets;x/data", "allow"),  # only the segment's name counts: not `secret`
        ("/ok/x;y/data", "allow"),
    ],
)
def test_deny_rules_see_through_segment_parameters(path: str, verdict: str) -> None:
    assert evaluate(NET, "h.test", 80, "GET", normalise_path(path)).verdict == verdict


NET_EXACT = Network.model_validate(
    {
        "allow": [{"host": "h.test", "ports": [80], "paths": ["/**"]}],
        "deny": [{"host": "h.test", "ports": [80], "paths": ["/ok/secret", "/ok/secret/**"]}],
    }
)


@pytest.mark.parametrize(
    ("path", "verdict"),
    [
        ("/ok/secret;", "deny"),  # what a Tomcat serves as /ok/secret
        ("/ok/secret;x", "deny"),
        ("/ok/secret;/data", "deny"),
        ("/ok/;x/secret", "deny"),  # an empty segment left by its parameter collapses
        ("/ok/secret", "deny"),
        ("/ok/secretx;", "allow"),
        ("/ok/public;x", "allow"),
    ],
)
def test_a_path_with_parameters_is_denied_as_its_bare_form(path: str, verdict: str) -> None:
    assert evaluate(NET_EXACT, "h.test", 80, "GET", normalise_path(path)).verdict == verdict


@pytest.mark.parametrize(
    "raw",
    ["/ok/%252e%252e/admin", "/ok/%252E%252E/admin", "/ok/%2573ecret/x", "/ok/%25%32%65/x"],
)
def test_double_encoding_is_refused(raw: str) -> None:
    """`%25` + two hex digits decodes to an escape: a server that decodes twice reads `..` or
    `secret` where the rules saw a literal. Ambiguous across servers: refused."""
    with pytest.raises(HttpError) as err:
        normalise_path(raw)
    assert err.value.status == 400 and "double" in err.value.reason, err.value.reason


@pytest.mark.parametrize("raw", ["/100%25", "/100%25off", "/a%25-b"])
def test_a_percent_sign_that_is_data_passes(raw: str) -> None:
    assert normalise_path(raw) == raw
