"""The one client of a proxy's admin socket (admin.py's AdminServer): the control plane decides
approvals with it, `appliance status` lists them with it.

Standard library only, on purpose: `status` imports it to read a tiny JSON answer per sandbox,
and httpx plus the proxy would more than double its cost. The server speaks HTTP/1.1, one request
per connection, and closes after answering (`Connection: close`), so reading to EOF is the body.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any
from urllib.parse import quote

MAX_ANSWER = 4 << 20  # a proxy's pending list is a few KiB; anything near this is not our server


class AdminClient:
    """list / approve / deny on one proxy. A 404 (no such approval) raises KeyError, any other
    error status RuntimeError; connecting or reading past `timeout` raises OSError/TimeoutError."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing held between calls (one connection per call); kept for callers' symmetry."""

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/approvals")["pending"])

    def approve(self, approval_id: str, persist: bool = False) -> dict[str, Any]:
        return self._call("POST", f"/approvals/{_seg(approval_id)}/approve?persist={int(persist)}")

    def deny(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        """`reason` replaces "denied by operator" in the refusal the sandbox gets (an expiry)."""
        query = f"?reason={_seg(reason)}" if reason else ""
        return self._call("POST", f"/approvals/{_seg(approval_id)}/deny{query}")

    def _call(self, method: str, target: str) -> dict[str, Any]:
        status, body = self._exchange(method, target)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if status == 404:
            raise KeyError(payload.get("error", target))
        if status != 200:
            raise RuntimeError(payload.get("error", f"HTTP {status}"))
        return payload

    def _exchange(self, method: str, target: str) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout
        request = (
            f"{method} {target} HTTP/1.1\r\nHost: proxy-admin\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        )
        chunks: list[bytes] = []
        size = 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(request.encode())
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise RuntimeError(f"answer over {MAX_ANSWER} bytes from {self.socket_path}")
                if time.monotonic() > deadline:  # a trickle must not outlast the timeout
                    raise TimeoutError(f"{self.socket_path}: no full answer in {self.timeout} s")
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise RuntimeError(f"not an HTTP answer from {self.socket_path}: {head[:80]!r}")
        return int(parts[1]), body


def _seg(value: str) -> str:
    return quote(value, safe="")
