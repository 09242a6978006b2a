"""Held egress and the operator's answer, on real sockets (tests/integration/egress_harness.py):
an unknown host is held until approved, denied or timed out; approvals are deduplicated, can
persist to the policy file, and work over the admin unix socket the CLI uses."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sandbox.policy import Endpoint, Policy, load_policy
from sandbox.proxy import AdminClient, AdminServer, ApprovalBroker, FilePolicyWriter
from sandbox.proxy.http1 import read_head
from tests.integration.egress_harness import environment, exchange, network, run

pytestmark = pytest.mark.integration


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
            # No control plane here to deny it at hold_seconds: the proxy's backstop refuses it
            # backstop_grace_s later (5 s in production; 0.5 s here)
            env.proxy.update_network(network(mode="hold", hold=0.5))
            env.broker.backstop_grace_s = 0.5
            start, wall = time.monotonic(), time.time()
            status, _, payload = await exchange(env, b"CONNECT unknown.test:443 HTTP/1.1\r\n\r\n")
            assert status == 403 and b"timed out (not answered within 0.5s)" in payload
            assert 0.9 < time.monotonic() - start < 2.5
            assert env.broker.list_pending() == []  # a stale entry is not left behind
            held = env.events("egress.held")[-1]
            assert wall <= held["expires"] - 0.5 <= wall + 0.5  # created + hold_seconds

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


def test_a_held_entry_says_when_it_expires_and_what_was_asked(tmp_path: Path) -> None:
    """What the control plane shows and expires by: `expires` (held + hold_seconds), the method,
    the path without its query (it may carry a secret); a CONNECT's path is inside its tunnel.
    The control plane's expiry reaches the sandbox as its reason, over the admin socket."""

    async def main() -> None:
        async with environment(tmp_path, network(mode="hold", hold=7)) as env:
            admin = AdminServer(env.broker, tmp_path / "admin.sock")
            await admin.start()
            client = AdminClient(tmp_path / "admin.sock")
            try:
                port = env.origin.port
                get = (
                    f"GET http://held.test:{port}/v1/items/42?api_key=SECRET HTTP/1.1\r\n"
                    f"Host: held.test:{port}\r\n\r\n"
                ).encode()
                wall = time.time()
                plain = asyncio.create_task(exchange(env, get))
                tunnel = asyncio.create_task(
                    exchange(env, b"CONNECT tunnel.test:443 HTTP/1.1\r\n\r\n")
                )
                for _ in range(200):
                    if len(env.broker.list_pending()) == 2:
                        break
                    await asyncio.sleep(0.01)
                listed = {p["host"]: p for p in await asyncio.to_thread(client.list)}
                held, connect = listed["held.test"], listed["tunnel.test"]
                assert (held["method"], held["path"]) == ("GET", "/v1/items/42")
                assert (connect["method"], connect["path"]) == ("CONNECT", None)
                for entry in (held, connect):
                    assert entry["expires"] - entry["created"] == pytest.approx(7)
                    assert wall - 0.1 <= entry["created"] <= time.time()
                assert "SECRET" not in str(listed)
                audited = {r["host"]: r for r in env.events("egress.held")}
                assert audited["held.test"]["expires"] == held["expires"]
                reason = "expired: not answered within 7s"
                await asyncio.to_thread(client.deny, held["id"], reason)
                await asyncio.to_thread(client.deny, connect["id"])
                status, _, payload = await plain
                assert status == 403 and reason.encode() in payload
                status, _, payload = await tunnel
                assert status == 403 and b"denied by operator" in payload
                assert env.events("egress.rejected")[0]["reason"] == reason
            finally:
                client.close()
                await admin.close()

    run(main())


def test_a_long_path_is_cut_for_the_operator() -> None:
    from sandbox.proxy.approvals import MAX_SHOWN_PATH, shown_path

    assert shown_path(None) is None and shown_path("/a?b=c") == "/a"
    cut = shown_path("/" + "x" * 5000 + "?q")
    assert cut is not None and len(cut) == MAX_SHOWN_PATH and cut.endswith("…")
