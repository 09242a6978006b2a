"""One exception type per failure an operator can act on, and the table of their exit codes.

The CLI prints `appliance: error: <message>` and, when the error has one, `  hint: <hint>`;
tracebacks only with APPLIANCE_DEBUG=1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from blueprints.errors import (
    BlueprintChanged,
    BlueprintError,
    BlueprintIncompatible,
    BlueprintNotFound,
)
from sandbox.lifecycle import errors as sandbox_errors
from sandbox.names import InvalidNameError


class ApplianceError(Exception):
    """Base of every error the operator should see as one line, not a traceback."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(ApplianceError):
    """A config file or value is invalid (message starts with `path:line:` where known)."""

    hint = "fix the file or value named above; `appliance config show` prints the merged config"


class StateError(ApplianceError):
    """The state directory or its SQLite store cannot be opened or migrated."""

    hint = "check the permissions of the state directory (APPLIANCE_STATE_DIR)"


class NotFoundError(ApplianceError):
    """A named thing (sandbox, key, model, snapshot file) does not exist."""


class PreflightError(ApplianceError):
    """The host is not ready: a doctor check failed."""

    hint = "run `appliance doctor` for the failing checks and how to fix each"


class BackendError(ApplianceError):
    """A service the command needs (backend, gateway, podman) is down or failed."""

    hint = "see `appliance status` and the service logs in the state directory"


class ConflictError(ApplianceError):
    """The request lost a race or contradicts the current state (HTTP 409): e.g. the approval was
    already decided, or a sandbox of that name exists."""

    hint = "read the current state (`list` / `status`) and decide again"


class BusyError(ApplianceError):
    """The control plane's slots for that kind of long call (agent turns, sandbox execs) are all
    taken (HTTP 429): refused at once rather than queued, so the data plane never starves the
    control plane (kill, release, status keep their own)."""

    hint = "try again when a running turn or exec has ended"


class TurnRefused(ApplianceError):
    """The control plane would not start an agent's turn, and says why: the kill switch holds,
    the agent is stopped, its daily budget is spent, or its runtime is not running (HTTP 409).
    The refusal is recorded in the agent's transcript and the audit log like any turn."""

    hint = "see `appliance agent list` and `appliance status`"


class ControlPlaneDown(BackendError):
    """A command that changes state found no control plane to send it to."""

    hint = "start it with `appliance up`"


class ControlPlaneNoAnswer(BackendError):
    """The control plane took the request and gave no answer (it died, or timed out): whether it
    acted is unknown."""

    hint = "check the result with `list` / `status` before trying again"


class AuthError(ApplianceError):
    """The control plane refused the caller: no or bad credentials (401), a role too low (403)."""

    hint = "use the unix socket as root or a member of `appliance-admin`, or an operator token"


# What the operator sees as one line and a hint: ours, and the sandbox lifecycle's (which imports
# nothing of ours, so its errors have their own base; each maps onto the same codes below).
OPERATOR_ERRORS: tuple[type[Exception], ...] = (ApplianceError, sandbox_errors.SandboxError)

# Exit codes, RamaLama-style: one table, most specific class first. 2 is typer's usage error.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (InvalidNameError, 3),
    (sandbox_errors.PolicyFileError, 3),
    (sandbox_errors.SandboxNotFound, 5),
    (sandbox_errors.HostNotReady, 6),
    (sandbox_errors.PodmanUnavailable, 7),
    (sandbox_errors.SandboxConflict, 10),
    (sandbox_errors.SandboxError, 1),
    (ConfigError, 3),
    (StateError, 4),
    (NotFoundError, 5),
    (PreflightError, 6),
    (BackendError, 7),
    (AuthError, 8),
    (ConflictError, 10),
    (BusyError, 11),
    (TurnRefused, 12),
    (ApplianceError, 1),
    (PermissionError, 8),
    (OSError, 9),
    (KeyboardInterrupt, 130),
]


# The same classes as HTTP: status and the error body's `type`, most specific first
# (appliance/control/api/errors.py answers with it; the client maps `type` back to the class).
HTTP_STATUS: list[tuple[type[BaseException], int, str]] = [
    (InvalidNameError, 422, "config_error"),
    (sandbox_errors.PolicyFileError, 422, "config_error"),
    (sandbox_errors.SandboxNotFound, 404, "not_found"),
    (sandbox_errors.HostNotReady, 412, "preflight_failed"),
    (sandbox_errors.PodmanUnavailable, 503, "backend_unavailable"),
    (sandbox_errors.SandboxConflict, 409, "conflict"),
    (sandbox_errors.SandboxError, 400, "invalid_request"),
    (ConfigError, 422, "config_error"),
    (StateError, 500, "state_error"),
    (NotFoundError, 404, "not_found"),
    (PreflightError, 412, "preflight_failed"),
    (BackendError, 503, "backend_unavailable"),
    (ConflictError, 409, "conflict"),
    (BusyError, 429, "busy"),
    (TurnRefused, 409, "turn_refused"),
    (AuthError, 403, "forbidden"),
    (ApplianceError, 400, "invalid_request"),
]


def exit_code_for(exc: BaseException) -> int:
    for exc_type, code in EXIT_CODES:
        if isinstance(exc, exc_type):
            return code
    return 1


@contextmanager
def blueprint_errors() -> Iterator[None]:
    """The blueprints package's errors as ours (one line, an exit code, a hint): for the control
    plane and for the CLI's local blueprint commands alike."""
    try:
        yield
    except BlueprintNotFound as exc:
        raise NotFoundError(str(exc), hint="`appliance blueprint list`") from None
    except BlueprintIncompatible as exc:
        raise ConfigError(
            str(exc), hint="upgrade the appliance or pick an older blueprint version"
        ) from None
    except BlueprintChanged as exc:
        raise ApplianceError(
            str(exc), hint="blueprint versions must not be edited in place: publish a new version"
        ) from None
    except BlueprintError as exc:
        raise ConfigError(str(exc), hint="fix the blueprint at the line named") from None
