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
    (
        "inference: api keys (hashed), usage ledger, daily totals, budgets, budget marks, audit",
        """
        CREATE TABLE api_keys (
            id            TEXT PRIMARY KEY,
            name          TEXT NOT NULL,
            owner_kind    TEXT NOT NULL CHECK (owner_kind IN ('client', 'sandbox')),
            secret_sha256 TEXT NOT NULL UNIQUE,
            created_at    REAL NOT NULL,
            revoked_at    REAL
        );
        CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
        CREATE TABLE usage_ledger (
            id                INTEGER PRIMARY KEY AUTOINCREMENT,
            ts                REAL    NOT NULL,
            key_id            TEXT    NOT NULL,
            model             TEXT    NOT NULL,
            prompt_tokens     INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_s         REAL    NOT NULL,
            status            INTEGER NOT NULL,
            stream            INTEGER NOT NULL,
            cost              REAL    NOT NULL
        );
        CREATE INDEX usage_ledger_key_ts ON usage_ledger (key_id, ts);
        -- Kept in step with usage_ledger (same transaction): budget checks read a handful of
        -- rows instead of summing a month of requests.
        CREATE TABLE usage_daily (
            key_id            TEXT    NOT NULL,
            day               TEXT    NOT NULL,
            prompt_tokens     INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cost              REAL    NOT NULL,
            requests          INTEGER NOT NULL,
            PRIMARY KEY (key_id, day)
        ) WITHOUT ROWID;
        CREATE TABLE budgets (
            key_id         TEXT PRIMARY KEY REFERENCES api_keys (id),
            daily_tokens   INTEGER,
            monthly_tokens INTEGER,
            daily_cost     REAL,
            monthly_cost   REAL,
            updated_at     REAL NOT NULL
        );
        CREATE TABLE budget_marks (
            key_id  TEXT NOT NULL,
            budget  TEXT NOT NULL,
            level   TEXT NOT NULL,
            period  TEXT NOT NULL,
            ts      REAL NOT NULL,
            PRIMARY KEY (key_id, budget, level, period)
        ) WITHOUT ROWID;
        CREATE TABLE audit_events (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            ts        REAL NOT NULL,
            event     TEXT NOT NULL,
            key_id    TEXT,
            data_json TEXT NOT NULL
        );
        CREATE INDEX audit_events_ts ON audit_events (ts);
        """,
    ),
    (
        "sandboxes: records, policy revisions (persisted approvals are revisions), kill hold",
        """
        CREATE TABLE sandboxes (
            name         TEXT PRIMARY KEY,
            container_id TEXT,
            image        TEXT NOT NULL,
            command_json TEXT NOT NULL,
            key_id       TEXT,
            state        TEXT NOT NULL,
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL
        );
        -- Revisions outlive the sandbox record: a re-created sandbox of the same name starts
        -- from its latest revision, persisted approvals included.
        CREATE TABLE policy_revisions (
            sandbox     TEXT    NOT NULL,
            rev         INTEGER NOT NULL,
            policy_yaml TEXT    NOT NULL,
            reason      TEXT    NOT NULL,
            created_at  REAL    NOT NULL,
            PRIMARY KEY (sandbox, rev)
        );
        CREATE TABLE kill_hold (
            id     INTEGER PRIMARY KEY CHECK (id = 1),
            held   INTEGER NOT NULL,
            reason TEXT,
            since  REAL
        );
        """,
    ),
    (
        "agents: which blueprint each agent's sandbox runs, and every deployment (for rollback)",
        """
        CREATE TABLE agent_deployments (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            agent       TEXT    NOT NULL,
            blueprint   TEXT    NOT NULL,
            version     TEXT    NOT NULL,
            digest      TEXT    NOT NULL,
            image       TEXT    NOT NULL,
            outcome     TEXT    NOT NULL CHECK (outcome IN ('active', 'replaced')),
            reason      TEXT    NOT NULL,
            created_at  REAL    NOT NULL
        );
        CREATE INDEX agent_deployments_agent ON agent_deployments (agent, id);
        CREATE TABLE agent_activity (
            agent      TEXT PRIMARY KEY,
            last_turn  REAL,
            turns      INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        "keys: per-key model allowlist (NULL: any model, as every key made before it)",
        """
        -- A JSON array of model names as the key's user sends them; the gateway resolves them
        -- through its aliases on each request. One column, not a table: authentication reads
        -- one row, and a key's list never changes (an agent's new blueprint gets a new key).
        ALTER TABLE api_keys ADD COLUMN allowed_models_json TEXT;
        """,
    ),
    (
        "gateway admission: ledger rows from admission (state, reservation, owner); key scopes",
        """
        -- A row is written `open` at admission, holding the request's reservation (upper
        -- bounds), and settled at the end (`ok`, `error`, `cancelled`); rows left open by a
        -- gateway that died are settled `interrupted` by the next start, charged their
        -- reservation. Rows from before this migration were written settled.
        ALTER TABLE usage_ledger ADD COLUMN request_id TEXT;
        ALTER TABLE usage_ledger ADD COLUMN state TEXT NOT NULL DEFAULT 'ok';
        ALTER TABLE usage_ledger ADD COLUMN reserved_prompt INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_ledger ADD COLUMN reserved_completion INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_ledger ADD COLUMN reserved_cost REAL NOT NULL DEFAULT 0;
        ALTER TABLE usage_ledger ADD COLUMN owner TEXT;
        UPDATE usage_ledger SET state = 'error' WHERE status != 200;
        CREATE UNIQUE INDEX usage_ledger_request ON usage_ledger (request_id)
            WHERE request_id IS NOT NULL;
        -- Admission sums a key's open reservations on every request: only open rows indexed.
        CREATE INDEX usage_ledger_open ON usage_ledger (key_id, ts) WHERE state = 'open';
        -- A JSON array of scopes (e.g. ["metrics"]); NULL: none, as every key made before.
        ALTER TABLE api_keys ADD COLUMN scopes_json TEXT;
        """,
    ),
    (
        "control plane: operators (tokens for its loopback port, stored hashed) and their roles",
        """
        -- Only the token's SHA-256 is kept: the store can check a token, never give one back.
        -- A revoked operator's row stays (who held which name, when); a new one may reuse it.
        CREATE TABLE operators (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            name         TEXT NOT NULL,
            role         TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
            token_sha256 TEXT NOT NULL UNIQUE,
            created_at   REAL NOT NULL,
            revoked_at   REAL
        );
        CREATE UNIQUE INDEX operators_live_name ON operators (name) WHERE revoked_at IS NULL;
        """,
    ),
    (
        "agents: each deployment's blueprint as deployed (canonical JSON) and where it came from",
        """
        -- `client`: YAML text a client sent (a file, not in the catalog): the agent's turns,
        -- upgrade and rollback resolve it from blueprint_json, checked against its digest.
        -- `catalog`: resolved from the catalog by name@version, as every deployment before.
        ALTER TABLE agent_deployments ADD COLUMN origin TEXT NOT NULL DEFAULT 'catalog'
            CHECK (origin IN ('catalog', 'client'));
        ALTER TABLE agent_deployments ADD COLUMN blueprint_json TEXT;
        """,
    ),
    (
        "control plane: approval decisions, so deciding one twice is a conflict across restarts",
        """
        -- A proxy forgets a request once decided; this row is how the control plane, restarted
        -- or not, answers a second decision with 409 naming the first. Only the newest few
        -- thousand are kept (appliance/store/approval_store.py).
        CREATE TABLE approval_decisions (
            id         TEXT    PRIMARY KEY,
            sandbox    TEXT    NOT NULL,
            host       TEXT    NOT NULL,
            port       INTEGER NOT NULL,
            decision   TEXT    NOT NULL CHECK (decision IN ('approved', 'denied')),
            actor      TEXT    NOT NULL,
            decided_at REAL    NOT NULL
        );
        """,
    ),
    (
        "scheduler: each agent's schedule entries, their next and last runs",
        """
        -- One row per agent and entry. `entry_key` hashes the entry as deployed (and its
        -- index): an upgrade that changes an entry gets a fresh row, never the old one's times;
        -- rows no current deployment has are deleted by the scheduler. The last run (started,
        -- and how it went) and the last skip are kept apart: a skip while a run goes on must
        -- not hide that run's outcome.
        CREATE TABLE schedule_state (
            agent            TEXT    NOT NULL,
            entry_key        TEXT    NOT NULL,
            entry_index      INTEGER NOT NULL,
            next_run_at      REAL,
            last_run_at      REAL,
            last_outcome     TEXT CHECK (last_outcome IN
                ('running', 'ok', 'failed', 'cancelled', 'interrupted')),
            last_reason      TEXT,
            last_skip_at     REAL,
            last_skip_reason TEXT,
            runs             INTEGER NOT NULL DEFAULT 0,
            skips            INTEGER NOT NULL DEFAULT 0,
            updated_at       REAL    NOT NULL,
            PRIMARY KEY (agent, entry_key)
        ) WITHOUT ROWID;
        """,
    ),
    (
        "approvals: 'expired' decisions (the control plane's expirer) and one-tap link nonces",
        """
        -- SQLite cannot widen a CHECK in place: the table is rebuilt with the same rows.
        CREATE TABLE approval_decisions_new (
            id         TEXT    PRIMARY KEY,
            sandbox    TEXT    NOT NULL,
            host       TEXT    NOT NULL,
            port       INTEGER NOT NULL,
            decision   TEXT    NOT NULL CHECK (decision IN ('approved', 'denied', 'expired')),
            actor      TEXT    NOT NULL,
            decided_at REAL    NOT NULL
        );
        INSERT INTO approval_decisions_new SELECT * FROM approval_decisions ORDER BY rowid;
        DROP TABLE approval_decisions;
        ALTER TABLE approval_decisions_new RENAME TO approval_decisions;
        -- A one-tap link's nonce, recorded when the link is used: a second use finds it here
        -- (appliance/control/one_tap.py). Rows outlive their link's expiry by a day, then go.
        CREATE TABLE one_tap_nonces (
            nonce      TEXT PRIMARY KEY,
            approval   TEXT NOT NULL,
            webhook    TEXT NOT NULL,
            expires_at REAL NOT NULL,
            used_at    REAL NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
]
