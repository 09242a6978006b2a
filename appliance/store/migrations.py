"""Forward-only schema migrations, applied in order; PRAGMA user_version holds the last applied.

Later features append to MIGRATIONS; never edit a migration that has shipped.
"""

MIGRATIONS: list[tuple[str, str]] = [
    (
        "base: meta and applied serving plans",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE plans (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL    NOT NULL,
            backend    TEXT    NOT NULL,
            model      TEXT    NOT NULL,
            plan_json  TEXT    NOT NULL
        );
        """,
    ),
]
