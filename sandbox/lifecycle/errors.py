"""The errors a sandbox's lifecycle raises (create, start, proxy, kill switch), each with a hint.

One line and a hint for the operator, never a traceback. The appliance maps each class onto its
exit codes and HTTP statuses (appliance/errors.py EXIT_CODES, appliance/control/api/errors.py).
"""

from __future__ import annotations


class SandboxError(Exception):
    """A sandbox operation failed in a way the operator can act on (exit 1, HTTP 400)."""

    hint: str | None = "see `appliance sandbox logs NAME` and the proxy log in the state directory"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class SandboxNotFound(SandboxError):
    """No sandbox (or policy) of that name (exit 5, HTTP 404)."""

    hint = None  # each raise names its own (the list command, or nothing)


class SandboxConflict(SandboxError):
    """The request contradicts the current state: the name is taken, or the kill switch holds
    (exit 10, HTTP 409)."""

    hint = "read the current state (`appliance sandbox list`) and decide again"


class HostNotReady(SandboxError):
    """This host cannot run sandboxes yet: no Podman, no service user, no subuid range (exit 6)."""

    hint = "run `appliance doctor` for the failing checks and how to fix each"


class PodmanUnavailable(SandboxError):
    """The service user's Podman cannot be started or reached from here (exit 7, HTTP 503)."""

    hint = "see `appliance status` and the service logs in the state directory"


class PolicyFileError(SandboxError):
    """A policy file does not parse or validate (exit 3, HTTP 422)."""

    hint = "fix the policy file at the line named"
