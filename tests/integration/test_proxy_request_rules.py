"""Request-target and framing tricks against the egress proxy on real sockets (issue 11, items
5, 6 and 8): each one was forwarded, or passed a rule it should not have, before the fix.

The same tricks go through a real sandbox in tests/integration/test_proxy_hardening.py; here they
run in-process, where the origin can say exactly which target it received."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sandbox.proxy import ApprovalBroker
from tests.integration.egress_harness import (
    Env,
    environment,
    exchange,
    get,
    network,
    read_response,
    run,
    with_origin_port,
)

pytestmark = pytest.mark.integration


def rules(port: int):
    allow = {"host": "origin.test", "ports": [port], "paths": ["/ok/**"], "allow_private": True}
    deny = {"host": "origin.test", "ports": [port], "paths": ["/ok/secret/**"]}
    return network(allow, deny=[deny])


# (raw path, what must happen): "deny" = 403 and the origin saw nothing; "bad" = 400.
PATH_TRICKS = [
    ("/ok/../admin", "deny"),  # escapes the allow rule by dot segment
    ("/ok/%2e%2e/admin", "deny"),  # ... percent-encoded
    ("/ok/%2E%2e/admin", "deny"),
    ("/ok/.%2e/admin", "deny"),
    ("/ok//secret/x", "deny"),  # empty segment slips past the deny rule
    ("/ok/./secret/x", "deny"),
    ("/ok/%73ecret/x", "deny"),  # %73 = s
    ("/ok/SECRET/x", "deny"),  # servers that fold case serve the secret
    ("/ok/Secret/x", "deny"),
    ("/ok/%53ECRET/x", "deny"),
    ("/ok/x/..;/secret/y", "bad"),  # Tomcat-style path parameter on a dot segment
    ("/ok/%2fsecret/x", "bad"),  # an encoded slash: one segment or two, depending who asks
    ("/ok/%2Fsecret", "bad"),
    ("/ok/%5csecret", "bad"),  # an encoded backslash
    ("/ok/\\secret", "bad"),
    ("/ok/%00", "bad"),
    ("/ok/%zz", "bad"),
    ("/ok/\x7fx", "bad"),
    ("/ok/\xe9", "bad"),
    ("/ok/a#frag", "bad"),
    ("/ok/secret;/data", "deny"),  # Tomcat, Jetty, Spring route it as /ok/secret/data
    ("/ok/secret;x/data", "deny"),
    ("/ok/secret;jsessionid=1/x", "deny"),
    ("/ok/%252e%252e/admin", "bad"),  # double-encoded: `..` to a server that decodes twice
    ("/ok/%2573ecret/x", "bad"),
]


@pytest.mark.parametrize(("raw", "expect"), PATH_TRICKS, ids=[ascii(r) for r, _ in PATH_TRICKS])
def test_path_tricks_do_not_pass_the_rules(tmp_path: Path, raw: str, expect: str) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        req = get(f"http://origin.test:{p}{raw}", f"origin.test:{p}")
        status, _, payload = await exchange(env, req)
        assert status == (403 if expect == "deny" else 400), (raw, status, payload)
        assert env.origin.seen == []

    run(with_origin_port(tmp_path, rules, body))


# (raw path, what the origin must receive): allowed, and forwarded in the normalised form.
NORMALISED = [
    ("/ok/a/../b", "/ok/b"),
    ("/ok/%61%7e%2D", "/ok/a~-"),  # unreserved escapes decoded
    ("/ok/a%3fb%2a", "/ok/a%3Fb%2A"),  # reserved ones kept, hex upper-cased
    ("/ok//a/./b?x=%2f&y=..", "/ok/a/b?x=%2f&y=.."),  # the query is not a path
    ("/ok/caf%C3%A9", "/ok/caf%C3%A9"),
]


@pytest.mark.parametrize(("raw", "forwarded"), NORMALISED)
def test_the_normalised_target_is_what_is_forwarded(
    tmp_path: Path, raw: str, forwarded: str
) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        status, _, _ = await exchange(env, get(f"http://origin.test:{p}{raw}", f"origin.test:{p}"))
        assert status == 200
        assert [s["target"] for s in env.origin.seen] == [forwarded]

    run(with_origin_port(tmp_path, rules, body))


def test_allow_rules_stay_case_sensitive(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        status, _, _ = await exchange(env, get(f"http://origin.test:{p}/OK/x", f"origin.test:{p}"))
        assert status == 403 and env.origin.seen == []

    run(with_origin_port(tmp_path, rules, body))


def _chunked(size_line: bytes, p: int) -> bytes:
    return (
        (
            f"POST http://origin.test:{p}/ok/x HTTP/1.1\r\nHost: origin.test:{p}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + size_line
        + b"\r\nhello\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize("size_line", [b"0x5", b"+5", b"-5", b"5 ", b" 5", b"0_5", b"5\t"])
def test_chunk_sizes_must_be_plain_hex(tmp_path: Path, size_line: bytes) -> None:
    async def body(env: Env) -> None:
        status, _, _ = await exchange(env, _chunked(size_line, env.origin.port))
        assert status == 400, size_line
        assert all(s["body"] != "hello" for s in env.origin.seen)  # no body got through

    allow = {"host": "origin.test", "ports": [0], "paths": ["/ok/**"], "allow_private": True}
    run(with_origin_port(tmp_path, lambda p: network({**allow, "ports": [p]}), body))


def test_plain_hex_chunks_still_pass(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        status, _, _ = await exchange(env, _chunked(b"5;name=value", env.origin.port))
        assert status == 200 and env.origin.seen[-1]["body"] == "hello"

    allow = {"host": "origin.test", "ports": [0], "paths": ["/ok/**"], "allow_private": True}
    run(with_origin_port(tmp_path, lambda p: network({**allow, "ports": [p]}), body))


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",  # duplicate, even if equal
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: \xb2\r\n",  # a latin-1 superscript two: str.isdigit() says yes
        "Transfer-Encoding: gzip, chunked\r\n",
    ],
    ids=["cl-and-te", "cl-twice", "cl-conflict", "cl-plus", "cl-superscript", "te-gzip"],
)
def test_ambiguous_framing_is_refused(tmp_path: Path, framing: str) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        raw = (
            f"POST http://origin.test:{p}/ok/x HTTP/1.1\r\nHost: origin.test:{p}\r\n{framing}\r\n"
        ).encode("latin-1") + b"hello"
        status, _, _ = await exchange(env, raw)
        assert status == 400 and env.origin.seen == []

    allow = {"host": "origin.test", "ports": [0], "paths": ["/ok/**"], "allow_private": True}
    run(with_origin_port(tmp_path, lambda p: network({**allow, "ports": [p]}), body))


# --- inference.local carries the OpenAI paths only ---------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/health", "/health/ready", "/docs", "/openapi.json", "/v1/../metrics",
     "/v1/%2e%2e/metrics", "/V1/models", "/v10/models", "/"],
)  # fmt: skip
def test_inference_local_forwards_only_v1(tmp_path: Path, path: str) -> None:
    async def main() -> None:
        async with environment(tmp_path, network()) as env:
            req = get(f"http://inference.local{path}", "inference.local")
            status, _, payload = await exchange(env, req)
            assert status == 403 and b"only /v1/" in payload, (path, status, payload)
            reader, writer = await env.open()
            writer.write(b"CONNECT inference.local:80 HTTP/1.1\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            writer.write(f"GET {path} HTTP/1.1\r\nHost: inference.local\r\n\r\n".encode())
            status, _, payload = await read_response(reader)
            assert status == 403 and b"only /v1/" in payload
            writer.close()
            assert env.gateway.seen == []
            denied = [r for r in env.events("egress.deny") if "only /v1/" in r["reason"]]
            assert len(denied) == 2 and denied[0]["host"] == "inference.local"

    run(main())


def test_inference_local_v1_paths_are_normalised_and_forwarded(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network()) as env:
            req = get("http://inference.local/v1/./chat//completions", "inference.local")
            status, _, _ = await exchange(env, req)
            assert status == 200
            assert env.gateway.seen[-1]["target"] == "/v1/chat/completions"

    run(main())


# --- approval flood ------------------------------------------------------------------------------


def test_pending_approvals_are_capped_per_sandbox(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network(mode="hold", hold=5)) as env:
            env.broker.max_pending = 3
            connects = [f"CONNECT h{i}.test:443 HTTP/1.1\r\n\r\n".encode() for i in range(3)]
            held = [asyncio.create_task(exchange(env, c)) for c in connects]
            for _ in range(200):
                if len(env.broker.list_pending()) == 3:
                    break
                await asyncio.sleep(0.01)
            status, _, payload = await asyncio.wait_for(
                exchange(env, b"CONNECT h9.test:443 HTTP/1.1\r\n\r\n"), 2
            )
            assert status == 403 and b"pending approvals" in payload
            assert len(env.broker.list_pending()) == 3
            # another request for a host already pending joins it: not a new approval
            joined = asyncio.create_task(exchange(env, b"CONNECT h0.test:443 HTTP/1.1\r\n\r\n"))
            await asyncio.sleep(0.1)
            assert not joined.done() and len(env.broker.list_pending()) == 3
            flood = [r for r in env.events("egress.deny") if "pending approvals" in r["reason"]]
            assert [r["host"] for r in flood] == ["h9.test"]
            for p in env.broker.list_pending():
                env.broker.deny(p.id)
            for task in [*held, joined]:
                assert (await task)[0] == 403

    run(main())


def test_broker_default_cap() -> None:
    assert ApprovalBroker().max_pending == 10
