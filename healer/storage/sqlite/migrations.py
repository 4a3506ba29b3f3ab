"""The SQLite schema as an ordered list of migrations, each recorded in `schema_versions` once applied.

A second backend follows the same numbered list with its own SQL, so that version N means the same
tables everywhere. Stores from before versions were recorded are brought up by the same steps: each
is safe on a file that already has what it creates.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from healer.storage import migration
from healer.storage.sqlite.transactions import rollback

# One row per webhook delivery, its body as received; `done` counts the alerts the engine processed.
# A new id is the largest + 1, and purge always keeps the newest row, so an id is never used twice.
# (AUTOINCREMENT would too, at the price of one more page written per commit.)
INBOX_TABLE = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,
    alerts INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    processed_at REAL
)"""

HEALING_SCHEMA = f"""
{INBOX_TABLE};
CREATE INDEX IF NOT EXISTS inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL;
CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    starts_at_epoch REAL NOT NULL,
    alertname TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    rule TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    resolved_at REAL,
    silence_id TEXT,
    UNIQUE (fingerprint, starts_at)
);
CREATE INDEX IF NOT EXISTS episodes_state ON episodes(state);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    episode_id INTEGER NOT NULL REFERENCES episodes(id),
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    rule TEXT NOT NULL,
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    skip_reason TEXT,
    not_before REAL NOT NULL,
    approval_deadline REAL,
    approved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    plan TEXT,
    detail TEXT,
    exit_code INTEGER,
    output TEXT,
    UNIQUE (episode_id, attempt)
);
CREATE INDEX IF NOT EXISTS actions_state ON actions(state, not_before);
CREATE TABLE IF NOT EXISTS cooldowns (
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    until REAL NOT NULL,
    streak INTEGER NOT NULL,
    PRIMARY KEY (rule, fingerprint)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    episode_id INTEGER,
    action_id INTEGER,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_episode ON events(episode_id);
-- HealingFailed of an escalated episode, kept until Alertmanager has it and, later, its resolution.
CREATE TABLE IF NOT EXISTS escalations (
    episode_id INTEGER PRIMARY KEY REFERENCES episodes(id),
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_send REAL,
    sent_at REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS escalations_due ON escalations(next_send) WHERE next_send IS NOT NULL;
"""

GOALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS goals (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    description TEXT NOT NULL,
    labels TEXT NOT NULL,
    target_query TEXT NOT NULL,
    target_below REAL,
    target_above REAL,
    plan TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    deadline REAL NOT NULL,
    settle REAL NOT NULL,
    trigger_value REAL,
    started_at REAL,
    ended_at REAL,
    initial_value REAL,
    last_value REAL,
    progress REAL,
    measured_at REAL,
    next_step INTEGER NOT NULL DEFAULT 0,
    step_started_at REAL,
    step_running INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    steps TEXT NOT NULL DEFAULT '[]'
);
-- The database itself keeps "one open goal per key", so two cycles can never open the same goal twice.
CREATE UNIQUE INDEX IF NOT EXISTS goals_open_key ON goals(key) WHERE state IN ('pending', 'in_progress');
CREATE INDEX IF NOT EXISTS goals_open ON goals(state) WHERE state IN ('pending', 'in_progress');
CREATE INDEX IF NOT EXISTS goals_key_ended ON goals(key, ended_at);
"""

TRIALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS optimizations (
    id INTEGER PRIMARY KEY,
    candidate TEXT NOT NULL,
    component TEXT NOT NULL,
    outcome TEXT NOT NULL,
    confidence REAL NOT NULL,
    score REAL NOT NULL,
    before REAL,
    after REAL,
    improvement REAL,
    applied_at REAL NOT NULL,
    measure_at REAL,
    ended_at REAL,
    detail TEXT NOT NULL DEFAULT '',
    verdict TEXT,
    acknowledged_at REAL
);
CREATE INDEX IF NOT EXISTS optimizations_candidate ON optimizations(candidate, id);
"""


REPLICAS_SCHEMA = """
ALTER TABLE actions ADD COLUMN replica TEXT;
ALTER TABLE actions ADD COLUMN lease_until REAL;
-- The action budget's circuit breaker, one row: open while open_until is in the future.
CREATE TABLE IF NOT EXISTS circuit (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    open_until REAL NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO circuit (id, open_until) VALUES (1, 0);
-- One row per action charged to the budget, kept for the budget's window.
CREATE TABLE IF NOT EXISTS budget (started_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS budget_started ON budget(started_at);
-- A strategy run in progress, held while its replica renews it.
CREATE TABLE IF NOT EXISTS slots (
    id INTEGER PRIMARY KEY,
    replica TEXT NOT NULL,
    strategy TEXT NOT NULL,
    lease_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    replica TEXT NOT NULL,
    until REAL NOT NULL
);
"""


def _statements(script: str) -> list[str]:
    """A script's statements, each complete by SQLite's own reading (a semicolon in a comment or a
    string does not end one)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current)
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement: {current.strip()[:80]}")
    return statements


def _execute_script(script: str) -> Callable[[sqlite3.Connection], None]:
    statements = _statements(script)

    def apply(db: sqlite3.Connection) -> None:
        # executescript would COMMIT the migration's transaction; statements one by one stay inside it.
        for statement in statements:
            db.execute(statement)

    return apply


def _inbox_per_delivery(db: sqlite3.Connection) -> None:
    """Turn an inbox of one row per alert (the layout of early builds) into one row per delivery."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(inbox)")}
    if "alert" not in columns:
        return
    db.execute("DROP INDEX IF EXISTS inbox_unprocessed")
    db.execute("ALTER TABLE inbox RENAME TO inbox_per_alert")
    db.execute(INBOX_TABLE)
    db.execute("CREATE INDEX inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL")
    db.execute(
        "INSERT INTO inbox (received_at, body, alerts) SELECT received_at,"
        " json_object('version', '4', 'status', status, 'alerts', json_array(json(alert))), 1"
        " FROM inbox_per_alert WHERE processed_at IS NULL ORDER BY id"
    )
    db.execute("DROP TABLE inbox_per_alert")


RAILS_SCHEMA = """
-- Operators' pauses: alerts their matchers select are recorded, not acted on, until ends_at or ended_at.
CREATE TABLE IF NOT EXISTS pauses (
    id INTEGER PRIMARY KEY,
    matchers TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    ended_at REAL,
    ended_by TEXT
);
-- Rules' own budgets beside the global one (scope '').
ALTER TABLE budget ADD COLUMN scope TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS budget_scope ON budget(scope, started_at);
-- A label group's slot (blast radius) rather than a strategy's: grp is set, strategy is ''.
ALTER TABLE slots ADD COLUMN grp TEXT;
-- Episodes acted on per label group, for blast_radius's share of a fleet within a window.
CREATE TABLE IF NOT EXISTS shares (
    grp TEXT NOT NULL,
    episode_id INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (grp, episode_id)
);
-- Alerts that flap, until they have been quiet for the rule's flapping window.
CREATE TABLE IF NOT EXISTS flapping (
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (rule, fingerprint)
);
CREATE INDEX IF NOT EXISTS episodes_fingerprint ON episodes(fingerprint, created_at);
CREATE INDEX IF NOT EXISTS actions_held ON actions(skip_reason) WHERE state = 'pending';
"""

SESSIONS_SCHEMA = """
-- A console session by the SHA-256 digest of its id (the id itself is kept nowhere): its user, roles and
-- credential kind, when it opened and expires, and who closed it when. Kept until it expires, closed or not.
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    user_name TEXT NOT NULL,
    roles TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    closed_at REAL,
    closed_by TEXT,
    credential BLOB NOT NULL DEFAULT x''
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires_at);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions(id) WHERE closed_at IS NULL;
-- The secret of the console's CSRF tokens, one row, drawn by the first healer that starts on the store.
CREATE TABLE IF NOT EXISTS console_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    csrf BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""

Migration = migration.Migration[Callable[[sqlite3.Connection], None]]

MIGRATIONS: tuple[Migration, ...] = migration.numbered(
    (
        # Before the inbox's tables are created, so that an early per-alert inbox is converted first.
        _inbox_per_delivery,
        _execute_script(HEALING_SCHEMA),
        _execute_script(GOALS_SCHEMA),
        _execute_script(TRIALS_SCHEMA),
        _execute_script(REPLICAS_SCHEMA),
        _execute_script(RAILS_SCHEMA),
        _execute_script(SESSIONS_SCHEMA),
    )
)


def schema_version(db: sqlite3.Connection) -> int:
    """The newest migration recorded in the file; 0 for a new file or one from before versions were kept."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_versions (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
               " applied_at REAL NOT NULL)")  # fmt: skip
    return int(db.execute("SELECT coalesce(max(version), 0) FROM schema_versions").fetchone()[0])


def migrate(db: sqlite3.Connection, clock: Callable[[], float]) -> int:
    """Apply, each in its own transaction, the migrations the file has not had; return the version reached."""
    version = schema_version(db)
    for step in migration.pending(MIGRATIONS, version):
        db.execute("BEGIN IMMEDIATE")
        try:
            step.apply(db)
            db.execute(
                "INSERT INTO schema_versions (version, description, applied_at) VALUES (?, ?, ?)",
                (step.version, step.description, clock()),
            )
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        version = step.version
    return version
