"""The per-sandbox egress proxy: HTTP/1.1 forward proxy and CONNECT tunnels on a unix socket.

The socket a connection came in on is the sandbox's identity (one socket per sandbox), so
nothing the agent sends can claim to be another sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from dataclasses import dataclass

from sandbox.policy import Network
from sandbox.proxy.addresses import ip_literal, is_forbidden, system_resolver
from sandbox.proxy.approvals import ApprovalBroker, TooManyPending
from sandbox.proxy.decide import evaluate
from sandbox.proxy.forward import close_quietly, forward_exchange
from sandbox.proxy.http1 import (
    STREAM_LIMIT,
    Head,
    HttpError,
    error_response,
    read_head,
)
from sandbox.proxy.paths import normalise_target
from sandbox.proxy.ports import AuditSink, InferenceRoute, Resolver
from sandbox.proxy.splice import splice

INFERENCE_HOST = "inference.local"
INFERENCE_PREFIX = "/v1/"  # the OpenAI API: the only paths a sandbox may reach on the gateway
CONNECT_TIMEOUT = 10.0


class Refused(Exception):
    """A decision to refuse: answered with 403 (or `status`) and the reason."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Target:
    host: str
    port: int


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if not host or not host.isascii() or any(c in host for c in " /\\@?#%"):
        raise HttpError(400, f"bad host {host!r}")
    return host


def parse_authority(authority: str, default_port: int | None = None) -> Target:
    """`host:port` (IPv6 literals in brackets)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HttpError(400, "bad IPv6 authority")
        host, rest = authority[1:end], authority[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
    if port_text is None or (not port_text and default_port is None):
        raise HttpError(400, f"bad authority {authority!r}")
    if port_text and (not port_text.isdigit() or not 1 <= int(port_text) <= 65535):
        raise HttpError(400, f"bad port in {authority!r}")
    port = int(port_text) if port_text else default_port
    assert port is not None
    return Target(_normal_host(host), port)


def _split_absolute(url: str) -> tuple[str, str]:
    """(authority, `/path?query`) of an absolute-form target, as sent. Not urlsplit: it drops
    tabs and newlines and cuts fragments silently, so what it returns is not what was sent."""
    rest = url.split("://", 1)[1]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[cut:]
    return rest[:cut], target if target.startswith("/") else "/" + target


def _origin_form(url: str) -> str:
    return _split_absolute(url)[1]


class EgressProxy:
    def __init__(
        self,
        sandbox_name: str,
        socket_path: str | os.PathLike[str],
        network: Network,
        *,
        resolver: Resolver | None = None,
        approvals: ApprovalBroker,
        audit: AuditSink,
        inference: InferenceRoute | None = None,
        socket_mode: int = 0o666,  # the agent's uid is a subuid: the directory guards access
        approved_may_be_private: bool = False,  # tests on loopback; never in production
        listen_sock: socket.socket | None = None,  # already bound and listening (see start)
    ) -> None:
        self.sandbox = sandbox_name
        self.socket_path = os.fspath(socket_path)
        self._network = network
        self._resolve = resolver or system_resolver
        self._approvals = approvals
        self._audit = audit
        self._inference = inference
        self._socket_mode = socket_mode
        self._approved_private = approved_may_be_private
        self._listen_sock = listen_sock
        self._approved: set[tuple[str, int]] = set()  # for this proxy's life only
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def network(self) -> Network:
        return self._network

    @property
    def approvals(self) -> ApprovalBroker:
        return self._approvals

    def update_network(self, network: Network) -> None:
        """Hot reload: every request or tunnel decided from now on uses these rules."""
        self._network = network
        self._audit.audit("egress.policy_reloaded", sandbox=self.sandbox)

    async def start(self) -> None:
        if self._listen_sock is not None:
            # Bound by the control plane before the sandbox started: connections made while
            # this process was still starting wait in the backlog instead of failing.
            self._server = await asyncio.start_unix_server(
                self._handle, sock=self._listen_sock, limit=STREAM_LIMIT
            )
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(
            self._handle, path=self.socket_path, limit=STREAM_LIMIT
        )
        os.chmod(self.socket_path, self._socket_mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._listen_sock is None:  # an inherited socket is its binder's to remove
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def __aenter__(self) -> EgressProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connection handling -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            while True:
                head = await read_head(reader)
                if head is None:
                    return
                method, target, _ = head.first
                if method == "CONNECT":
                    await self._connect(reader, writer, head)
                    return
                if target.lower().startswith("http://"):
                    if not await self._plain(reader, writer, head):
                        return
                    continue
                raise HttpError(400, "a proxy takes CONNECT or an absolute http:// URL")
        except Refused as exc:
            await self._answer(writer, exc.status, exc.reason)
        except HttpError as exc:
            await self._answer(writer, exc.status, exc.reason)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            await close_quietly(writer)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(error_response(status, reason))
            await writer.drain()

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: Head
    ) -> None:
        target = parse_authority(head.first[1])
        if target.host == INFERENCE_HOST:
            self._check_inference(target, "CONNECT")
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await self._serve_inference(reader, writer, target)
            return
        up_r, up_w = await self._open(target, "CONNECT", None)
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await splice(reader, writer, up_r, up_w)

    async def _plain(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: Head
    ) -> bool:
        method, url, _ = head.first
        authority, raw_path = _split_absolute(url)
        if "@" in authority:
            raise HttpError(400, "credentials in the URL are not accepted")
        target = parse_authority(authority, default_port=80)
        path = normalise_target(raw_path)  # what is judged is what is forwarded
        hosts = head.get_all("host")
        if len(hosts) > 1:
            raise Refused("more than one Host header")
        if hosts:
            try:
                claimed = parse_authority(hosts[0], default_port=80)
            except HttpError:
                claimed = None
            if claimed != target:
                self._audit_deny(target, method, "Host header does not match the request target")
                raise Refused(f"Host header {hosts[0]!r} does not match the request target")
        if target.host == INFERENCE_HOST:
            self._require_v1(target, method, path)
            self._check_inference(target, method)
            return await self._to_gateway(reader, writer, head, path)
        up_r, up_w = await self._open(target, method, path)
        try:
            default = 80
            host_header = target.host if target.port == default else f"{target.host}:{target.port}"
            return await forward_exchange(
                reader, writer, head, up_r, up_w, target=path, host_header=host_header
            )
        finally:
            await close_quietly(up_w)

    # --- inference.local -------------------------------------------------------------------

    def _check_inference(self, target: Target, method: str) -> None:
        rule = evaluate(self._network, target.host, target.port)
        if rule.verdict == "deny":
            self._audit_deny(target, method, rule.reason)
            raise Refused(rule.reason)
        if self._inference is None:
            self._audit_deny(target, method, "no inference route for this sandbox")
            raise Refused("no inference route for this sandbox")
        self._audit.audit(
            "egress.allow", sandbox=self.sandbox, host=target.host, port=target.port,
            method=method, reason="inference.local → gateway",
        )  # fmt: skip

    def _require_v1(self, target: Target, method: str, path: str) -> None:
        """The sandbox's route to the gateway carries the OpenAI API only: not /metrics (every
        key's usage), /health, /docs. `path` is normalised, so /v1/../metrics is /metrics."""
        bare = path.split("?", 1)[0]
        if not bare.startswith(INFERENCE_PREFIX):
            reason = f"inference.local carries only {INFERENCE_PREFIX}... (not {bare})"
            self._audit_deny(target, method, reason)
            raise Refused(reason)

    async def _serve_inference(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tunnel: Target
    ) -> None:
        """Plain HTTP inside the tunnel: every request goes to the gateway, whatever Host says."""
        while True:
            head = await read_head(reader)
            if head is None:
                return
            target = head.first[1]
            if target.lower().startswith("http://"):
                target = _origin_form(target)
            if not target.startswith("/"):
                raise HttpError(400, "expected an origin-form request inside the tunnel")
            path = normalise_target(target)
            self._require_v1(tunnel, head.first[0], path)
            if not await self._to_gateway(reader, writer, head, path):
                return

    async def _to_gateway(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: Head, path: str
    ) -> bool:
        route = self._inference
        assert route is not None and path.startswith(INFERENCE_PREFIX)
        self._audit.audit(
            "egress.inference", sandbox=self.sandbox, host=INFERENCE_HOST, port=route.port,
            method=head.first[0], reason=path.split("?", 1)[0],
        )  # fmt: skip
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_r, up_w = await asyncio.open_connection(
                    route.host,
                    route.port,
                    limit=STREAM_LIMIT,
                    ssl=ssl.create_default_context() if route.scheme == "https" else None,
                )
        except (OSError, TimeoutError) as exc:
            raise HttpError(502, f"gateway unreachable: {type(exc).__name__}") from None
        try:
            return await forward_exchange(
                reader, writer, head, up_r, up_w,
                target=route.path(path), host_header=route.netloc,
                drop=("authorization",), add=(("Authorization", f"Bearer {route.key}"),),
                secret=route.key,
            )  # fmt: skip
        finally:
            await close_quietly(up_w)

    # --- decisions ----------------------------------------------------------------------

    async def _open(
        self, target: Target, method: str, path: str | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Decide, resolve once, refuse forbidden addresses, connect to the resolved IP."""
        allow_private = await self._decide(target, method, path)
        try:
            ips = await self._resolve(target.host, target.port)
        except OSError as exc:
            self._audit_deny(target, method, f"cannot resolve {target.host}")
            raise Refused(f"cannot resolve {target.host}: {exc}", 502) from None
        usable = ips if allow_private else [ip for ip in ips if not is_forbidden(ip)]
        if not usable:
            reason = f"{target.host} resolves to a private or reserved address"
            self._audit_deny(target, method, reason)
            raise Refused(reason)
        last: Exception | None = None
        for ip in usable:  # the resolved address, never the name again: no DNS rebinding
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    up = await asyncio.open_connection(ip, target.port, limit=STREAM_LIMIT)
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            self._audit.audit(
                "egress.allow", sandbox=self.sandbox, host=target.host, port=target.port,
                method=method, reason="allowed", ip=ip,
            )  # fmt: skip
            return up
        self._audit.audit(
            "egress.error", sandbox=self.sandbox, host=target.host, port=target.port,
            method=method, reason=f"connect failed: {last!r}",
        )  # fmt: skip
        raise Refused(f"cannot connect to {target.host}:{target.port}", 502)

    async def _decide(self, target: Target, method: str, path: str | None) -> bool:
        """Allowed → whether private addresses are fine; else raise Refused."""
        network = self._network  # one snapshot per decision, even across a reload
        l7 = (method, path) if path is not None else (None, None)
        rule = evaluate(network, target.host, target.port, *l7)
        if rule.verdict == "allow":
            return rule.allow_private
        if rule.verdict == "deny":
            self._audit_deny(target, method, rule.reason)
            raise Refused(rule.reason)
        if (target.host, target.port) in self._approved:
            return self._approved_private
        if ip_literal(target.host) is None and network.approval.mode == "hold":
            return await self._hold(target, method, path, network.approval.hold_seconds)
        self._audit_deny(target, method, rule.reason)
        raise Refused(rule.reason)

    async def _hold(self, target: Target, method: str, path: str | None, seconds: float) -> bool:
        try:
            pending = self._approvals.request(
                self.sandbox, target.host, target.port,
                hold_seconds=seconds, method=method, path=path,
            )  # fmt: skip
        except TooManyPending as exc:
            self._audit_deny(target, method, str(exc))
            raise Refused(str(exc)) from None
        self._audit.audit(
            "egress.held", sandbox=self.sandbox, host=target.host, port=target.port,
            method=method, reason=f"waiting up to {pending.hold_seconds:g}s for approval",
            approval=pending.id, expires=pending.expires,
        )  # fmt: skip
        # Until the control plane denies it at `expires`, or the backstop a little later
        verdict = await self._approvals.wait(pending)
        if not verdict.approved:
            self._audit_deny(target, method, verdict.reason)
            raise Refused(verdict.reason)
        self._approved.add((target.host, target.port))
        return self._approved_private  # by default an approval never opens private addresses

    def _audit_deny(self, target: Target, method: str, reason: str) -> None:
        self._audit.audit(
            "egress.deny", sandbox=self.sandbox, host=target.host, port=target.port,
            method=method, reason=reason,
        )  # fmt: skip
