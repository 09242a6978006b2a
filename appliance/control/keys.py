"""Keys for inference.local and their budgets, as the control plane sets them.

The control plane owns the configuration (which keys exist, their models, scopes and limits);
the gateway reads it from the same store on its hot path (admission, the ledger). The store
audits each change inside its transaction, with who asked (`actor`: Principal.audit_fields()).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from appliance.errors import NotFoundError
from appliance.ops.usage import budget_report
from inference.ports import Budget, KeyRecord, OwnerKind

if TYPE_CHECKING:
    from appliance.store.inference_store import InferenceStore

LIMITS = ("daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost")


def key_data(key: KeyRecord) -> dict[str, Any]:
    """A key as the API and `appliance keys ... --json` show it (never its secret)."""
    return {
        "id": key.id,
        "name": key.name,
        "owner_kind": key.owner_kind,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "state": "revoked" if key.revoked_at else "live",
        # null: any model; a list: only these (as resolved by the gateway's aliases)
        "allowed_models": None if key.allowed_models is None else list(key.allowed_models),
        "scopes": list(key.scopes),  # e.g. ["metrics"]: may scrape the gateway's /metrics
    }


class KeyService:
    def __init__(self, store: InferenceStore, served: Callable[[str], bool]) -> None:
        """`served`: whether the gateway resolves a model name now (the served model, an
        alias or an upstream model), for the create answer's warnings."""
        self.store = store
        self.served = served

    def create(
        self,
        name: str,
        owner_kind: OwnerKind = "client",
        allowed_models: Sequence[str] | None = None,
        scopes: Sequence[str] = (),
        actor: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The new key with its `secret` (returned this once, stored only hashed) and
        `warnings`: a model it allows that is not served here allows nothing until the config
        names it (a warning, not an error: the config may be about to change)."""
        from appliance.store.names import check_key_name, check_scopes

        check_key_name(name, owner_kind)  # before the store is touched
        key, secret = self.store.create_key(
            name, owner_kind, allowed_models, check_scopes(scopes, owner_kind), actor
        )
        warnings = [
            f"model {model!r} is not served here (not the served model, an alias or an "
            "upstream model): it allows nothing until the config names it"
            for model in key.allowed_models or ()
            if not self.served(model)
        ]
        return {**key_data(key), "secret": secret, "warnings": warnings}

    def list(self) -> list[dict[str, Any]]:
        return [key_data(k) for k in self.store.list_keys()]

    def revoke(self, name_or_id: str, actor: Mapping[str, Any] | None = None) -> dict[str, Any]:
        revoked = self.store.revoke_key(name_or_id, actor)
        if revoked is None:
            raise NotFoundError(
                f"no live key named or with id {name_or_id!r}",
                hint="`appliance keys list` shows the keys",
            )
        return key_data(revoked)

    def budgets(self, key: str | None = None) -> list[dict[str, Any]]:
        """Each live key's (or one key's) limits, spend, reservations and state."""
        return budget_report(self.store, key)

    def set_budget(
        self,
        key: str,
        limits: dict[str, Any],
        clear: bool = False,
        actor: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Set the limits given (None: keep; `clear`: drop every limit first); the key's report.
        The same request twice leaves the same budget: a PUT."""
        record = self.store.find_key(key)
        if record is None or record.revoked_at is not None:
            raise NotFoundError(
                f"no live key named or with id {key!r}", hint="`appliance keys list`"
            )
        current = (None if clear else self.store.get_budget(record.id)) or Budget(record.id)
        given = {name: limits[name] for name in LIMITS if limits.get(name) is not None}
        self.store.set_budget(replace(current, **given), actor)
        return budget_report(self.store, record.id)[0]
