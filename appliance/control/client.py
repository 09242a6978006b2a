"""The CLI's typed client of the control plane's API (over its unix socket).

Errors come back as the ApplianceError they were raised as (by the `type` in the JSON body), so
the CLI's exit codes are the same whether a command acted itself or through the API. No socket,
or nothing listening on it: ControlPlaneDown (exit 7, hint `appliance up`). Any other transport
failure (it died or timed out mid-request): ControlPlaneNoAnswer (exit 7), the outcome unknown.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

from appliance import errors as e
from appliance.config import ApplianceConfig
from appliance.control.paths import socket_path


# `type` -> class, the reverse of appliance.errors.HTTP_STATUS (its first, most specific class of
# ours for each type); a 401 (raised by auth, not by an error class) is an AuthError too.
def _classes_by_type() -> dict[str, type[e.ApplianceError]]:
    classes: dict[str, type[e.ApplianceError]] = {"unauthorized": e.AuthError}
    for cls, _status, type_ in e.HTTP_STATUS:
        if issubclass(cls, e.ApplianceError):
            classes.setdefault(type_, cls)
    return classes


_ERRORS = _classes_by_type()

DEFAULT_TIMEOUT_S = 60.0
CREATE_TIMEOUT_S = 300.0  # a create may wait for another call on its name (an agent's upgrade)
EXEC_TIMEOUT_S = 660.0  # the control plane stops an exec'd command after 600 s
LONG_TIMEOUT_S = 3600.0  # an agent create, upgrade or turn (see the agents block)


class ControlClient:
    def __init__(self, config: ApplianceConfig, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket = socket_path(config)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://control/api/v1",
            timeout=timeout,
        )

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @contextmanager
    def _transport(self, method: str, path: str) -> Iterator[None]:
        """Transport failures as the errors the CLI reports (see the module)."""
        try:
            yield
        except (httpx.ConnectError, FileNotFoundError) as exc:
            if _denied(exc):  # it runs; this user may not connect (0660, appliance-admin)
                raise e.AuthError(
                    f"permission denied on {self.socket}",
                    hint="run it as root or a member of the appliance-admin group",
                ) from exc
            raise e.ControlPlaneDown(
                f"the control plane is not running (nothing answers on {self.socket})"
            ) from exc
        except httpx.TransportError as exc:  # it died or hung mid-request: it may have acted
            raise e.ControlPlaneNoAnswer(
                f"{method} {path}: no answer from the control plane "
                f"({type(exc).__name__}: {exc or 'no detail'}); whether it acted is unknown"
            ) from exc

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; the decoded JSON body, or the ApplianceError it answered with."""
        with self._transport(method, path):
            response = self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json() if response.content else None
        raise _error(response)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def put(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("PUT", path, json=body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    # -- typed calls (one per endpoint; commands use these, not paths) -------------------------

    def status(self) -> dict[str, Any]:
        return self.get("/status")

    # -- control-sandboxes: sandboxes, approvals, the kill switch ------------------------------

    def sandboxes(self) -> list[dict[str, Any]]:
        return self.get("/sandboxes")

    def sandbox(self, name: str) -> dict[str, Any]:
        return self.get(f"/sandboxes/{_seg(name)}")

    def create_sandbox(
        self,
        name: str,
        policy: str,
        source: str,
        command: list[str] | None = None,
        image: str | None = None,
    ) -> dict[str, Any]:
        body = {"name": name, "policy": policy, "source": source, "command": command}
        return self.post("/sandboxes", body | {"image": image}, timeout=CREATE_TIMEOUT_S)

    def sandbox_policy(self, name: str) -> dict[str, Any]:
        return self.get(f"/sandboxes/{_seg(name)}/policy")

    def set_sandbox_policy(self, name: str, policy: str, source: str) -> int:
        body = {"policy": policy, "source": source}
        return int(self.put(f"/sandboxes/{_seg(name)}/policy", body)["rev"])

    def stop_sandbox(self, name: str) -> dict[str, Any]:
        return self.post(f"/sandboxes/{_seg(name)}/stop")

    def start_sandbox(self, name: str) -> dict[str, Any]:
        return self.post(f"/sandboxes/{_seg(name)}/start")

    def remove_sandbox(self, name: str, keep_home: bool = False) -> dict[str, Any]:
        return self.delete(f"/sandboxes/{_seg(name)}", params={"keep_home": keep_home})

    def reconcile_sandboxes(self) -> dict[str, list[str]]:
        return self.post("/sandboxes/reconcile")

    def sandbox_logs(self, name: str, tail: int | None = None) -> str:
        """The last `tail` lines (the control plane's default, 1000, when None)."""
        path = f"/sandboxes/{_seg(name)}/logs" + (f"?tail={tail}" if tail is not None else "")
        return str(self.get(path)["logs"])

    def sandbox_exec(
        self, name: str, argv: list[str], stdin: bytes
    ) -> tuple[int, bytes, bytes, bool]:
        """(exit code, stdout, stderr, truncated): stdin sent whole, output returned whole (not a
        stream), each stream capped by the control plane (truncated: the command was stopped)."""
        body = {"argv": argv, "stdin": base64.b64encode(stdin).decode()}
        out = self.post(f"/sandboxes/{_seg(name)}/exec", body, timeout=EXEC_TIMEOUT_S)
        decode = base64.b64decode
        code, truncated = int(out["exit_code"]), bool(out.get("truncated"))
        return code, decode(out["stdout"]), decode(out["stderr"]), truncated

    def approvals(self) -> list[dict[str, Any]]:
        return self.get("/approvals")

    def approval_history(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.get("/approvals/history", params={"limit": limit})

    def approve(self, approval_id: str, persist: bool = False) -> dict[str, Any]:
        return self.post(f"/approvals/{_seg(approval_id)}/approve", {"persist": persist})

    def deny(self, approval_id: str) -> dict[str, Any]:
        return self.post(f"/approvals/{_seg(approval_id)}/deny")

    def kill(
        self,
        names: list[str] | None = None,
        all_: bool = False,
        hold: bool = False,
        reason: str = "operator kill switch",
    ) -> dict[str, Any]:
        body = {"names": list(names or []), "all": all_, "hold": hold, "reason": reason}
        return self.post("/kill", body)

    def release(self) -> dict[str, Any]:
        return self.post("/release")

    # -- notifications: webhooks and a test delivery -------------------------------------------

    def webhooks(self) -> list[dict[str, Any]]:
        return self.get("/notify")

    def test_webhook(self, name: str) -> dict[str, Any]:
        return self.post(f"/notify/{_seg(name)}/test")

    # -- control-core: operators, keys, budgets, the audit log --------------------------------

    def operators(self) -> list[dict[str, Any]]:
        return self.get("/operators")

    def create_operator(self, name: str, role: str) -> dict[str, Any]:
        """The new operator with its token as `secret` (shown this once)."""
        return self.post("/operators", {"name": name, "role": role})

    def revoke_operator(self, name: str) -> dict[str, Any]:
        return self.delete(f"/operators/{_seg(name)}")

    def keys(self) -> list[dict[str, Any]]:
        return self.get("/keys")

    def create_key(
        self,
        name: str,
        owner_kind: str = "client",
        allowed_models: list[str] | None = None,
        scopes: list[str] | None = None,
    ) -> dict[str, Any]:
        """The new key with its `secret` (shown this once) and `warnings` (e.g. a model not
        served here)."""
        body = {"name": name, "owner_kind": owner_kind, "allowed_models": allowed_models}
        return self.post("/keys", body | {"scopes": list(scopes or [])})

    def revoke_key(self, name_or_id: str) -> dict[str, Any]:
        return self.delete(f"/keys/{_seg(name_or_id)}")

    def budgets(self, key: str | None = None) -> list[dict[str, Any]]:
        return self.get("/budgets", params={"key": key} if key is not None else None)

    def set_budget(self, key: str, limits: dict[str, Any], clear: bool = False) -> dict[str, Any]:
        """Set the limits given (None: keep); `clear` drops every limit first. The key's row."""
        return self.put(f"/budgets/{_seg(key)}", {**limits, "clear": clear})

    def audit_tail(
        self,
        limit: int = 20,
        event: str | None = None,
        sandbox: str | None = None,
        after: int | None = None,
    ) -> dict[str, Any]:
        """{"records", "next"}: the last records, or those after the cursor `after`."""
        params = {"limit": limit, "event": event, "sandbox": sandbox, "after": after}
        return self.get("/audit", params={k: v for k, v in params.items() if v is not None})

    # -- control-agents: agents made from blueprints -------------------------------------------
    # A create or upgrade may build an image, a turn may wait on a real model: minutes, so these
    # wait up to LONG_TIMEOUT_S (the turn's own timeout is the runtime's, inside the sandbox).

    def agents(self) -> list[dict[str, Any]]:
        return self.get("/agents")

    def create_agent(
        self,
        name: str,
        blueprint: str | None = None,
        yaml_text: str | None = None,
        source: str = "",
    ) -> dict[str, Any]:
        """From a catalog reference (`NAME[@VERSION]`) or a blueprint file's YAML text and its
        name (never a path: the control plane opens no file a caller names)."""
        body = {"name": name, "blueprint": blueprint, **_blueprint_file(yaml_text, source)}
        return self.post("/agents", body, timeout=LONG_TIMEOUT_S)

    def run_turn(self, name: str, message: str, session: str | None = None) -> dict[str, Any]:
        """The turn's done record, answered whole (with `stderr_tail`)."""
        body = {"message": message, "session": session}
        return self.post(f"/agents/{_seg(name)}/turns", body, timeout=LONG_TIMEOUT_S)

    def stream_turn(
        self, name: str, message: str, session: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The turn's events as they come: {"type": "delta", "text"}, {"type": "tool", ...},
        then the done record. A refusal is raised (TurnRefused) before any event; closing the
        iterator early drops the connection, which cancels the turn."""
        path = f"/agents/{_seg(name)}/turns"
        body = {"message": message, "session": session, "stream": True}
        with (
            self._transport("POST", path),
            self._http.stream("POST", path, json=body, timeout=LONG_TIMEOUT_S) as response,
        ):
            if not response.is_success:
                response.read()
                raise _error(response)
            for line in response.iter_lines():
                if line.strip():
                    event = _event(path, line, name)
                    yield event
                    if event.get("type") == "done":
                        return
        raise e.ControlPlaneNoAnswer(
            f"POST {path}: the turn's stream ended without its result (the control plane "
            "stopped?); see `appliance agent transcript` for what was recorded"
        )

    def stop_agent(self, name: str) -> dict[str, Any]:
        return self.post(f"/agents/{_seg(name)}/stop")

    def start_agent(self, name: str) -> dict[str, Any]:
        return self.post(f"/agents/{_seg(name)}/start")

    def upgrade_agent(
        self, name: str, version: str | None = None, yaml_text: str | None = None, source: str = ""
    ) -> dict[str, Any]:
        body = {"version": version, **_blueprint_file(yaml_text, source)}
        return self.post(f"/agents/{_seg(name)}/upgrade", body, timeout=LONG_TIMEOUT_S)

    def rollback_agent(self, name: str) -> dict[str, Any]:
        return self.post(f"/agents/{_seg(name)}/rollback", timeout=LONG_TIMEOUT_S)

    def remove_agent(self, name: str) -> dict[str, Any]:
        return self.delete(f"/agents/{_seg(name)}")

    def agent_transcript(self, name: str) -> list[dict[str, Any]]:
        return self.get(f"/agents/{_seg(name)}/transcript")

    def agent_schedule(self, name: str) -> list[dict[str, Any]]:
        """Each schedule entry with its next and last run (epoch seconds) and last outcome."""
        return self.get(f"/agents/{_seg(name)}/schedule")


def _event(path: str, line: str, agent: str) -> dict[str, Any]:
    """One NDJSON line of a turn's stream: an event, or ControlPlaneNoAnswer (not ours)."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise e.ControlPlaneNoAnswer(
            f"POST {path}: the turn's stream sent a line that is not an event: {line[:80]!r}",
            hint="is the socket the control plane's? `appliance status`; what the turn did: "
            f"`appliance agent transcript {agent}`",
        )
    return event


def _blueprint_file(yaml_text: str | None, source: str) -> dict[str, str]:
    """A blueprint file as the CLI read it: its YAML text, and its name for error lines."""
    return {} if yaml_text is None else {"blueprint_yaml": yaml_text, "source": source}


def _denied(exc: BaseException) -> bool:
    """Whether the connect failed for want of permission (EACCES somewhere in the chain)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:  # a chain may loop back on itself
        if isinstance(link, PermissionError):
            return True
        chain.append(link)
        link = link.__cause__ or link.__context__
    return False


def _seg(value: str) -> str:
    """One path segment, whatever the caller typed ('/' and '..' cannot change the route: dots
    are escaped too, or '..' would be resolved away before it is sent)."""
    return quote(value, safe="").replace(".", "%2E")


def _error(response: httpx.Response) -> e.ApplianceError:
    try:
        body = response.json()["error"]
        message, type_, hint = str(body["message"]), str(body["type"]), body.get("hint")
    except (ValueError, KeyError, TypeError):
        message, type_, hint = f"HTTP {response.status_code}: {response.text[:200]}", "", None
    cls = _ERRORS.get(type_, e.ApplianceError)
    return cls(message, hint) if hint else cls(message)
