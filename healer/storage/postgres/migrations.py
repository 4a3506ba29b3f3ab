"""The PostgreSQL schema as the same numbered migrations as SQLite's, each recorded in `schema_versions`.

Replicas that start together migrate one at a time: each migration runs in its own transaction under
a transaction-scoped advisory lock, and re-reads the version once it holds the lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from healer.storage import migration

# The advisory lock key that serialises migrations (any fixed number healer alone uses).
MIGRATION_LOCK = 0x6865616C6572  # "healer"

# One row per webhook delivery, its body the bytes received; `done` counts the alerts the engine processed.
HEALING_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id BIGSERIAL PRIMARY KEY,
    received_at DOUBLE PRECISION NOT NULL,
    body BYTEA NOT NULL,
    alerts INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    processed_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL;
CREATE TABLE IF NOT EXISTS episodes (
    id BIGSERIAL PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    starts_at_epoch DOUBLE PRECISION NOT NULL,
    alertname TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    rule TEXT,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    resolved_at DOUBLE PRECISION,
    silence_id TEXT,
    UNIQUE (fingerprint, starts_at)
);
CREATE INDEX IF NOT EXISTS episodes_state ON episodes(state);
CREATE TABLE IF NOT EXISTS actions (
    id BIGSERIAL PRIMARY KEY,
    episode_id BIGINT NOT NULL REFERENCES episodes(id),
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    rule TEXT NOT NULL,
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    skip_reason TEXT,
    not_before DOUBLE PRECISION NOT NULL,
    approval_deadline DOUBLE PRECISION,
    approved BOOLEAN NOT NULL DEFAULT FALSE,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
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
    until DOUBLE PRECISION NOT NULL,
    streak INTEGER NOT NULL,
    PRIMARY KEY (rule, fingerprint)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    episode_id BIGINT,
    action_id BIGINT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_episode ON events(episode_id);
-- HealingFailed of an escalated episode, kept until Alertmanager has it and, later, its resolution.
CREATE TABLE IF NOT EXISTS escalations (
    episode_id BIGINT PRIMARY KEY REFERENCES episodes(id),
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    next_send DOUBLE PRECISION,
    sent_at DOUBLE PRECISION,
    failures INTEGER NOT NULL DEFAULT 0,
    resolved_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS escalations_due ON escalations(next_send) WHERE next_send IS NOT NULL;
"""

GOALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS goals (
    id BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    description TEXT NOT NULL,
    labels TEXT NOT NULL,
    target_query TEXT NOT NULL,
    target_below DOUBLE PRECISION,
    target_above DOUBLE PRECISION,
    plan TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    settle DOUBLE PRECISION NOT NULL,
    trigger_value DOUBLE PRECISION,
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    initial_value DOUBLE PRECISION,
    last_value DOUBLE PRECISION,
    progress DOUBLE PRECISION,
    measured_at DOUBLE PRECISION,
    next_step INTEGER NOT NULL DEFAULT 0,
    step_started_at DOUBLE PRECISION,
    step_running BOOLEAN NOT NULL DEFAULT FALSE,
    detail TEXT NOT NULL DEFAULT '',
    steps TEXT NOT NULL DEFAULT '[]'
);
-- The database itself keeps "one open goal per key", so two replicas can never open the same goal twice.
CREATE UNIQUE INDEX IF NOT EXISTS goals_open_key ON goals(key) WHERE state IN ('pending', 'in_progress');
CREATE INDEX IF NOT EXISTS goals_open ON goals(state) WHERE state IN ('pending', 'in_progress');
CREATE INDEX IF NOT EXISTS goals_key_ended ON goals(key, ended_at);
"""

TRIALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS optimizations (
    id BIGSERIAL PRIMARY KEY,
    candidate TEXT NOT NULL,
    component TEXT NOT NULL,
    outcome TEXT NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    before DOUBLE PRECISION,
    after DOUBLE PRECISION,
    improvement DOUBLE PRECISION,
    applied_at DOUBLE PRECISION NOT NULL,
    measure_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    detail TEXT NOT NULL DEFAULT '',
    verdict TEXT,
    acknowledged_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS optimizations_candidate ON optimizations(candidate, id);
"""

REPLICAS_SCHEMA = """
ALTER TABLE actions ADD COLUMN IF NOT EXISTS replica TEXT;
ALTER TABLE actions ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION;
-- Renewal finds a replica's claims by its name.
CREATE INDEX IF NOT EXISTS actions_replica ON actions(replica) WHERE replica IS NOT NULL;
-- The action budget's circuit breaker, one row: open while open_until is in the future. Every charge
-- locks this row, which serialises the budget across replicas.
CREATE TABLE IF NOT EXISTS circuit (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    open_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
INSERT INTO circuit (id, open_until) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
-- One row per action charged to the budget, kept for the budget's window.
CREATE TABLE IF NOT EXISTS budget (started_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS budget_started ON budget(started_at);
-- A strategy run in progress, held while its replica renews it.
CREATE TABLE IF NOT EXISTS slots (
    id BIGSERIAL PRIMARY KEY,
    replica TEXT NOT NULL,
    strategy TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    replica TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
"""

RAILS_SCHEMA = """
-- Operators' pauses: alerts their matchers select are recorded, not acted on, until ends_at or ended_at.
CREATE TABLE IF NOT EXISTS pauses (
    id BIGSERIAL PRIMARY KEY,
    matchers TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    ends_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    ended_by TEXT
);
-- Rules' own budgets beside the global one (scope '').
ALTER TABLE budget ADD COLUMN IF NOT EXISTS scope TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS budget_scope ON budget(scope, started_at);
-- A label group's slot (blast radius) rather than a strategy's: grp is set, strategy is ''.
ALTER TABLE slots ADD COLUMN IF NOT EXISTS grp TEXT;
-- Episodes acted on per label group, for blast_radius's share of a fleet within a window.
CREATE TABLE IF NOT EXISTS shares (
    grp TEXT NOT NULL,
    episode_id BIGINT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (grp, episode_id)
);
-- Alerts that flap, until they have been quiet for the rule's flapping window.
CREATE TABLE IF NOT EXISTS flapping (
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (rule, fingerprint)
);
CREATE INDEX IF NOT EXISTS episodes_fingerprint ON episodes(fingerprint, created_at);
CREATE INDEX IF NOT EXISTS actions_held ON actions(skip_reason) WHERE state = 'pending';
"""


SESSIONS_SCHEMA = """
-- A console session by the SHA-256 digest of its id (the id itself is kept nowhere): its user, roles and
-- credential kind, when it opened and expires, and who closed it when. Kept until it expires, closed or not.
CREATE TABLE IF NOT EXISTS sessions (
    id BIGSERIAL PRIMARY KEY,
    digest BYTEA NOT NULL UNIQUE,
    user_name TEXT NOT NULL,
    roles TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    closed_by TEXT,
    credential BYTEA NOT NULL DEFAULT ''::bytea
);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions(expires_at);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions(id) WHERE closed_at IS NULL;
-- The secret of the console's CSRF tokens, one row, drawn by the first replica that starts: the same for all.
CREATE TABLE IF NOT EXISTS console_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    csrf BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
"""


def _execute_script(script: str) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def apply(conn: psycopg.AsyncConnection[Any]) -> None:
        # Without parameters, psycopg sends the whole script as one simple query, inside the transaction.
        await conn.execute(script.encode())

    return apply


async def _nothing(conn: psycopg.AsyncConnection[Any]) -> None:
    """PostgreSQL stores never had SQLite's early inbox of one row per alert; the version is kept for parity."""


Migration = migration.Migration[Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]]

MIGRATIONS: tuple[Migration, ...] = migration.numbered(
    (
        _nothing,
        _execute_script(HEALING_SCHEMA),
        _execute_script(GOALS_SCHEMA),
        _execute_script(TRIALS_SCHEMA),
        _execute_script(REPLICAS_SCHEMA),
        _execute_script(RAILS_SCHEMA),
        _execute_script(SESSIONS_SCHEMA),
    )
)

_VERSIONS_TABLE = (
    b"CREATE TABLE IF NOT EXISTS schema_versions (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
    b" applied_at DOUBLE PRECISION NOT NULL)"
)


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The newest migration recorded in the database; 0 for an empty one."""
    cursor = await conn.execute("SELECT to_regclass('schema_versions') IS NOT NULL")
    exists = await cursor.fetchone()
    if not exists or not exists[0]:
        return 0
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_versions")
    found = await cursor.fetchone()
    return int(found[0]) if found else 0


async def migrate(conn: psycopg.AsyncConnection[Any], clock: Callable[[], float]) -> int:
    """Apply, each in its own transaction under the advisory lock, the migrations the database has not had.

    `conn` autocommits between migrations; returns the version reached.
    """
    version = await schema_version(conn)
    for step in migration.pending(MIGRATIONS, version):
        async with conn.transaction():
            # Another replica may be migrating: wait for it, then see what it has done meanwhile.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(_VERSIONS_TABLE)
            version = await schema_version(conn)
            if step.version <= version:
                continue
            await step.apply(conn)
            await conn.execute(
                "INSERT INTO schema_versions (version, description, applied_at) VALUES (%s, %s, %s)",
                (step.version, step.description, clock()),
            )
            version = step.version
    return version
