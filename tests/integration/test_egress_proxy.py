"""The egress proxy's decisions on real sockets (tests/integration/egress_harness.py): plain
HTTP by method and path, private addresses, Host smuggling, CONNECT tunnels, inference.local
with the sandbox's key injected, hot reload, and an audit record for every decision.

Held requests and the operator's approvals: test_egress_approvals.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sandbox.proxy.http1 import read_head
from tests.integration.egress_harness import (
    KEY,
    Env,
    environment,
    exchange,
    get,
    network,
    origin_rule,
    read_response,
    run,
    with_origin_port,
)

pytestmark = pytest.mark.integration


# --- plain HTTP -----------------------------------------------------------------------------


def test_plain_http_allowed_by_method_and_path(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        status, _, payload = await exchange(
            env,
            get(f"http://origin.test:{p}/api/x?q=1", f"origin.test:{p}",
                extra="Proxy-Authorization: Basic Zm9v\r\nConnection: keep-alive, X-Drop\r\n"
                      "X-Drop: 1\r\n"),
        )  # fmt: skip
        assert status == 200
        seen = json.loads(payload)
        assert seen["target"] == "/api/x?q=1"
        assert seen["headers"]["host"] == f"origin.test:{p}"
        assert "proxy-authorization" not in seen["headers"]
        assert "x-drop" not in seen["headers"]  # named by Connection: hop-by-hop
        status, head, payload = await exchange(
            env, get(f"http://origin.test:{p}/api/x", f"origin.test:{p}", method="POST")
        )
        assert status == 403 and b"POST /api/x" in payload
        assert head.get("x-appliance-deny-reason")
        status, _, _ = await exchange(env, get(f"http://origin.test:{p}/admin", f"origin.test:{p}"))
        assert status == 403
        assert len(env.origin.seen) == 1

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p)), body))


def test_keep_alive_plain_requests_are_each_decided(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        reader, writer = await env.open()
        for _ in range(3):
            writer.write(get(f"http://origin.test:{p}/api/a", f"origin.test:{p}"))
            status, _, _ = await read_response(reader)
            assert status == 200
        writer.close()
        assert len(env.events("egress.allow")) == 3

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p)), body))


def test_loopback_refused_without_allow_private(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        status, _, payload = await exchange(
            env, get(f"http://origin.test:{p}/api/x", f"origin.test:{p}")
        )
        assert status == 403 and b"private" in payload
        assert env.origin.seen == []

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p, allow_private=False)), body))


@pytest.mark.parametrize("host", ["metadata.test", "mapped.test", "ten.test"])
def test_private_link_local_and_mapped_refused(tmp_path: Path, host: str) -> None:
    async def main() -> None:
        net = network({"host": host, "ports": [80, 443]})
        async with environment(tmp_path, net) as env:
            status, _, payload = await exchange(env, get(f"http://{host}/", host))
            assert status == 403 and b"private" in payload
            status, _, _ = await exchange(env, f"CONNECT {host}:443 HTTP/1.1\r\n\r\n".encode())
            assert status == 403
            assert len(env.events("egress.deny")) == 2

    run(main())


def test_host_header_smuggling_rejected(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        status, head, _ = await exchange(env, get(f"http://origin.test:{p}/api/x", "evil.example"))
        assert status == 403 and "Host header" in (head.get("x-appliance-deny-reason") or "")
        raw = (
            f"GET http://origin.test:{p}/api/x HTTP/1.1\r\nHost: origin.test:{p}\r\n"
            f"Host: evil.example\r\n\r\n"
        ).encode()
        status, _, _ = await exchange(env, raw)
        assert status == 403
        raw = (  # both framings: the classic request-smuggling shape
            f"POST http://origin.test:{p}/api/x HTTP/1.1\r\nHost: origin.test:{p}\r\n"
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode()
        status, _, _ = await exchange(env, raw)
        assert status in (400, 403)
        assert env.origin.seen == []

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p)), body))


# --- CONNECT ----------------------------------------------------------------------------------


def test_connect_allowed_splices_and_denied_is_403(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network()) as env:
            env.proxy.update_network(
                network({"host": "echo.test", "ports": [env.echo_port], "allow_private": True},
                        deny=[{"host": "*.origin.test", "ports": [env.echo_port]}])
            )  # fmt: skip
            reader, writer = await env.open()
            writer.write(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\n\r\n".encode())
            head = await read_head(reader)
            assert head is not None and head.first[1] == "200"
            for n in (1, 70_000):
                writer.write(b"x" * n)
                assert await reader.readexactly(n) == b"x" * n
            writer.write_eof()  # half-close passes through, the echo closes, so do we
            assert await reader.read() == b""
            writer.close()
            status, head, payload = await exchange(
                env, f"CONNECT api.origin.test:{env.echo_port} HTTP/1.1\r\n\r\n".encode()
            )
            assert status == 403 and b"denied by policy" in payload
            status, _, _ = await exchange(env, b"CONNECT nowhere.test:443 HTTP/1.1\r\n\r\n")
            assert status == 403  # approval mode deny: unknown host refused at once

    run(main())


# --- inference.local ----------------------------------------------------------------------------


def test_connect_inference_local_injects_key_and_streams(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network()) as env:
            reader, writer = await env.open()
            writer.write(b"CONNECT inference.local:80 HTTP/1.1\r\nHost: inference.local:80\r\n\r\n")
            head = await read_head(reader)
            assert head is not None and head.first[1] == "200"
            body = b'{"model":"m","messages":[]}'
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: evil.example\r\n"
                b"Authorization: Bearer agent-made-this-up\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, _, payload = await read_response(reader)
            assert status == 200
            seen = json.loads(payload)
            assert seen["headers"]["authorization"] == f"Bearer {KEY}"
            assert seen["headers"]["host"] == f"127.0.0.1:{env.gateway.port}"
            assert seen["target"] == "/v1/chat/completions"
            assert seen["body"] == body.decode()
            # chunked request body, same tunnel (keep-alive), streamed SSE answer
            writer.write(
                b"POST /v1/stream HTTP/1.1\r\nHost: inference.local\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            head = await read_head(reader)
            assert head is not None and head.first[1] == "200"
            assert (head.get("transfer-encoding") or "").lower() == "chunked"
            arrivals = []
            for _ in range(3):
                size = int(await reader.readuntil(b"\r\n"), 16)
                await reader.readexactly(size + 2)
                arrivals.append(time.monotonic())
            assert await reader.readuntil(b"\r\n\r\n") == b"0\r\n\r\n"
            assert arrivals[2] - arrivals[0] > 0.3  # incremental, not buffered to the end
            assert env.gateway.seen[-1]["body"] == "hello"
            writer.close()
            assert all(KEY not in json.dumps(r) for r in env.audit.records)
            assert len(env.events("egress.inference")) == 2

    run(main())


def test_absolute_form_inference_local_and_explicit_deny(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network()) as env:
            status, _, payload = await exchange(
                env, get("http://inference.local/v1/models", "inference.local")
            )
            assert status == 200
            assert json.loads(payload)["headers"]["authorization"] == f"Bearer {KEY}"
            env.proxy.update_network(network(deny=[{"host": "inference.local", "ports": [80]}]))
            status, _, _ = await exchange(env, b"CONNECT inference.local:80 HTTP/1.1\r\n\r\n")
            assert status == 403

    run(main())


# --- reload and audit -------------------------------------------------------------------------


def test_hot_reload_takes_effect_on_next_request(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        req = get(f"http://origin.test:{p}/api/x", f"origin.test:{p}")
        assert (await exchange(env, req))[0] == 200
        env.proxy.update_network(network(deny=[{"host": "origin.test", "ports": [p]}]))
        assert (await exchange(env, req))[0] == 403
        env.proxy.update_network(network(origin_rule(p)))
        assert (await exchange(env, req))[0] == 200

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p)), body))


def test_audit_records_every_decision(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        p = env.origin.port
        await exchange(env, get(f"http://origin.test:{p}/api/x", f"origin.test:{p}"))
        await exchange(env, get(f"http://origin.test:{p}/nope", f"origin.test:{p}"))
        await exchange(env, b"CONNECT elsewhere.test:443 HTTP/1.1\r\n\r\n")
        decisions = [r for r in env.audit.records if r["event"] in ("egress.allow", "egress.deny")]
        assert [r["event"] for r in decisions] == ["egress.allow", "egress.deny", "egress.deny"]
        for r in decisions:
            assert r["sandbox"] == "sb1" and {"host", "port", "method", "reason"} <= r.keys()
        assert decisions[0]["method"] == "GET" and decisions[2]["method"] == "CONNECT"

    run(with_origin_port(tmp_path, lambda p: network(origin_rule(p)), body))
