"""The egress proxy on real sockets: a unix socket in front, loopback origins behind, fake names.

Names like `origin.test` resolve (through an injected resolver) to 127.0.0.1, so the policy must
say `allow_private` for them; nothing leaves the machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.policy import Endpoint, Network, Policy, load_policy
from sandbox.proxy import (
    AdminClient,
    AdminServer,
    ApprovalBroker,
    EgressProxy,
    FilePolicyWriter,
    InferenceRoute,
    MemoryAudit,
)
from sandbox.proxy.http1 import Head, read_head

pytestmark = pytest.mark.integration

KEY = "sk-sandbox-secret-0123456789"


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


# --- loopback servers -----------------------------------------------------------------------


async def _read_body(reader: asyncio.StreamReader, head: Head) -> bytes:
    if (head.get("transfer-encoding") or "").lower() == "chunked":
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    return await reader.readexactly(int(head.get("content-length") or 0))


def _json_response(payload: dict[str, Any], status: int = 200) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class HttpOrigin:
    """Echoes what it got; `/stream` answers SSE events 0.2 s apart, chunked."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (head := await read_head(reader)) is not None:
                body = await _read_body(reader, head)
                record = {
                    "method": head.first[0],
                    "target": head.first[1],
                    "headers": {k.lower(): v for k, v in head.headers},
                    "body": body.decode(),
                }
                self.seen.append(record)
                if head.first[1].endswith("/stream"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                    )
                    for i in range(3):
                        event = f"data: {i}\n\n".encode()
                        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.2)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(_json_response(record))
                await writer.drain()
                if (head.get("connection") or "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclass
class Env:
    proxy: EgressProxy
    broker: ApprovalBroker
    audit: MemoryAudit
    origin: HttpOrigin
    gateway: HttpOrigin
    echo_port: int
    sock: str
    persisted: list[tuple[str, Endpoint]]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.sock)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if r["event"] == name]


class Recorder:
    def __init__(self, into: list[tuple[str, Endpoint]]) -> None:
        self.into = into

    async def persist_allow(self, sandbox: str, endpoint: Endpoint) -> None:
        self.into.append((sandbox, endpoint))


def network(*allow: dict[str, Any], deny: list[dict[str, Any]] | None = None,
            mode: str = "deny", hold: float = 5.0) -> Network:  # fmt: skip
    return Network.model_validate(
        {"allow": list(allow), "deny": deny or [], "approval": {"mode": mode, "hold_seconds": hold}}
    )


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, net: Network, private_ok: bool = False) -> AsyncIterator[Env]:
    origin, gateway = HttpOrigin(), HttpOrigin()
    servers = [
        await asyncio.start_server(origin.handle, "127.0.0.1", 0),
        await asyncio.start_server(gateway.handle, "127.0.0.1", 0),
        await asyncio.start_server(_echo, "127.0.0.1", 0),
    ]
    origin.port, gateway.port, echo_port = (s.sockets[0].getsockname()[1] for s in servers)
    names = {
        "origin.test": ["127.0.0.1"],
        "echo.test": ["127.0.0.1"],
        "api.origin.test": ["127.0.0.1"],
        "unknown.test": ["127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "ten.test": ["10.1.2.3"],
    }

    async def resolver(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"no such name {host}")
        return names[host]

    audit, persisted = MemoryAudit(), []
    broker = ApprovalBroker(writer=Recorder(persisted), audit=audit)
    sock = str(tmp_path / "egress.sock")
    proxy = EgressProxy(
        "sb1", sock, net, resolver=resolver, approvals=broker, audit=audit,
        inference=InferenceRoute(f"http://127.0.0.1:{gateway.port}", KEY),
        approved_may_be_private=private_ok,
    )  # fmt: skip
    async with proxy:
        try:
            yield Env(proxy, broker, audit, origin, gateway, echo_port, sock, persisted)
        finally:
            for s in servers:
                s.close()


async def exchange(env: Env, raw: bytes) -> tuple[int, Head, bytes]:
    reader, writer = await env.open()
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Head, bytes]:
    head = await read_head(reader)
    assert head is not None
    return int(head.first[1]), head, await _read_body(reader, head)


def get(url: str, host: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\n\r\n".encode()


ORIGIN_RO = {"host": "origin.test", "ports": [0], "access": "read-only",
             "paths": ["/api/**"], "allow_private": True}  # fmt: skip


def origin_rule(env_port: int, **over: Any) -> dict[str, Any]:
    return {**ORIGIN_RO, "ports": [env_port], **over}


async def with_origin_port(
    tmp_path: Path, make: Callable[[int], Network], body: Callable[[Env], Awaitable[None]]
) -> None:
    """The origin's port is only known once it listens: build the rules then, and reload."""
    async with environment(tmp_path, network()) as env:
        env.proxy.update_network(make(env.origin.port))
        await body(env)


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


# --- approvals --------------------------------------------------------------------------------


async def _wait_pending(broker: ApprovalBroker) -> str:
    for _ in range(200):
        if pending := broker.list_pending():
            return pending[0].id
        await asyncio.sleep(0.01)
    raise AssertionError("nothing was held")


def test_held_then_approved_passes_and_persists(tmp_path: Path) -> None:
    async def main() -> None:
        net = network(mode="hold", hold=5)
        async with environment(tmp_path, net) as env:
            connect = f"CONNECT unknown.test:{env.echo_port} HTTP/1.1\r\n\r\n".encode()
            held = asyncio.create_task(exchange(env, connect))
            twin = asyncio.create_task(exchange(env, connect))  # deduped into one approval
            approval = await _wait_pending(env.broker)
            await asyncio.sleep(0.05)
            assert len(env.broker.list_pending()) == 1
            await env.broker.approve(approval, persist=True)
            # approved, but unknown.test resolves to loopback: approvals never open private IPs
            for task in (held, twin):
                status, _, payload = await task
                assert status == 403 and b"private" in payload
            assert env.persisted == [("sb1", Endpoint(host="unknown.test", ports=[env.echo_port]))]
            assert env.events("egress.held") and env.events("egress.approved")

    run(main())


def test_held_then_approved_passes(tmp_path: Path) -> None:
    """Approve from another task → the held tunnel proceeds, and the next one is not held."""

    async def main() -> None:
        async with environment(tmp_path, network(mode="hold", hold=5), private_ok=True) as env:
            connect = f"CONNECT unknown.test:{env.echo_port} HTTP/1.1\r\n\r\n".encode()
            reader, writer = await env.open()
            writer.write(connect)
            answer = asyncio.create_task(read_head(reader))
            approval = await _wait_pending(env.broker)
            assert not answer.done()
            await env.broker.approve(approval)
            head = await answer
            assert head is not None and head.first[1] == "200"
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            start = time.monotonic()
            reader, writer = await env.open()
            writer.write(connect)
            head = await read_head(reader)
            assert head is not None and head.first[1] == "200"  # remembered for this proxy's life
            assert time.monotonic() - start < 0.5 and env.broker.list_pending() == []
            writer.close()
            assert env.persisted == []  # not persisted unless asked

    run(main())


def test_held_then_denied_and_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with environment(tmp_path, network(mode="hold", hold=5)) as env:
            held = asyncio.create_task(exchange(env, b"CONNECT unknown.test:443 HTTP/1.1\r\n\r\n"))
            env.broker.deny(await _wait_pending(env.broker))
            status, _, payload = await held
            assert status == 403 and b"denied by operator" in payload
            env.proxy.update_network(network(mode="hold", hold=0.5))
            start = time.monotonic()
            status, _, payload = await exchange(env, b"CONNECT unknown.test:443 HTTP/1.1\r\n\r\n")
            assert status == 403 and b"timed out" in payload
            assert 0.4 < time.monotonic() - start < 2
            assert env.broker.list_pending() == []  # a stale entry is not left behind

    run(main())


def test_admin_socket_from_another_process_view(tmp_path: Path) -> None:
    """The CLI's path: list/approve/deny over the admin unix socket (sync client in a thread)."""

    async def main() -> None:
        async with environment(tmp_path, network(mode="hold", hold=5)) as env:
            admin = AdminServer(env.broker, tmp_path / "admin.sock")
            await admin.start()
            client = AdminClient(tmp_path / "admin.sock")
            try:
                held = asyncio.create_task(
                    exchange(env, b"CONNECT unknown.test:443 HTTP/1.1\r\n\r\n")
                )
                await _wait_pending(env.broker)
                listed = await asyncio.to_thread(client.list)
                assert [(p["host"], p["port"]) for p in listed] == [("unknown.test", 443)]
                result = await asyncio.to_thread(client.approve, listed[0]["id"], True)
                assert result["persisted"] is True
                status, _, _ = await held
                assert status == 403  # loopback, as above; the approval itself went through
                assert env.persisted and env.persisted[0][1].host == "unknown.test"
                with pytest.raises(KeyError):
                    await asyncio.to_thread(client.deny, "nope")
            finally:
                client.close()
                await admin.close()

    run(main())


def test_file_policy_writer_adds_revision(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(Policy().to_yaml())
    FilePolicyWriter(path).persist_allow("sb1", Endpoint(host="api.example.com", ports=[443]))
    FilePolicyWriter(path).persist_allow("sb1", Endpoint(host="api.example.com", ports=[443]))
    assert load_policy(path).network.allow == [Endpoint(host="api.example.com", ports=[443])]


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
