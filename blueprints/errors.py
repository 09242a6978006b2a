"""The blueprints package's errors, in a module of their own with no third-party import: the
appliance maps them to its exit codes from appliance/errors.py, which the audit chain (run by
the stdlib-only egress monitor) imports too."""

from __future__ import annotations


class BlueprintError(ValueError):
    """A blueprint is invalid or ambiguous; the message names the file (and line)."""


class BlueprintNotFound(BlueprintError):
    """No blueprint (or no such version) by that name."""


class BlueprintIncompatible(BlueprintError):
    """The blueprint needs a newer appliance than the one running."""


class BlueprintChanged(BlueprintError):
    """name@version no longer has the digest a deployment pinned (edited in place)."""
