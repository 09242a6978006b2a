"""The SQLite state store (WAL) and its forward-only schema migrations."""

from appliance.store.db import Store, open_store

__all__ = ["Store", "open_store"]
