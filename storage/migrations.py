"""Numbered schema migrations for the chat database.

``MIGRATIONS[i]`` is schema version ``i + 1``. Each migration is a plain function taking a
``sqlite_utils.Database``; ``migrate`` runs every one not yet recorded in ``schema_migrations``,
each inside its own ``BEGIN IMMEDIATE`` transaction, so a crash leaves the schema at a whole
version and two processes opening the same file never apply a migration twice.

Append new migrations to the list; never edit or reorder a released one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import sqlite_utils

MIGRATIONS_TABLE = "schema_migrations"


def m001_initial_schema(db: sqlite_utils.Database) -> None:
    """Create conversations, messages, comparisons, training_rounds and policy_versions."""
    db.create_table(
        "conversations",
        {"id": str, "session_id": str, "system_prompt": str, "created_at": str},
        pk="id",
        not_null=["session_id", "created_at"],
    )
    db.create_table(
        "messages",
        {
            "id": int,
            "conversation_id": str,
            "role": str,
            "content": str,
            "policy_version": int,
            "sampling": str,  # JSON object or NULL
            "created_at": str,
        },
        pk="id",
        not_null=["conversation_id", "role", "content", "created_at"],
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db.create_table(
        "comparisons",
        {
            "id": str,
            "conversation_id": str,
            "session_id": str,
            "context": str,  # JSON list of {role, content}
            "answer_a": str,
            "answer_b": str,
            "version_a": int,
            "version_b": int,
            "sampling_a": str,  # JSON object or NULL
            "sampling_b": str,
            "choice": str,  # NULL until voted, then 'a' | 'b' | 'tie' | 'both_bad'
            "created_at": str,
            "voted_at": str,
        },
        pk="id",
        not_null=["conversation_id", "session_id", "context", "answer_a", "answer_b", "created_at"],
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db.create_table(
        "training_rounds",
        {
            "id": int,
            "trigger": str,
            "status": str,  # running | succeeded | skipped | failed | rejected
            "reason": str,
            "metrics": str,  # JSON object or NULL
            "version": int,
            "votes_used": int,
            "started_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null=["trigger", "status", "reason", "votes_used", "started_at"],
        defaults={"reason": "", "votes_used": 0},
    )
    db.create_table(
        "policy_versions",
        {
            "version": int,
            "path": str,
            "parent": int,
            "round_id": int,
            "metrics": str,  # JSON object or NULL
            "status": str,  # live | candidate | rejected | retired
            "created_at": str,
        },
        pk="version",
        not_null=["path", "status", "created_at"],
        foreign_keys=[("round_id", "training_rounds", "id")],
    )


def m002_indexes(db: sqlite_utils.Database) -> None:
    """Index the hot lookups and enforce at most one live policy version."""
    db["messages"].create_index(["conversation_id", "id"])
    db["comparisons"].create_index(["voted_at"])
    db["comparisons"].create_index(["choice"])
    db["training_rounds"].create_index(["status", "started_at"])
    # sqlite-utils has no partial indexes; this one makes a second 'live' row impossible.
    db.execute(
        "CREATE UNIQUE INDEX idx_policy_versions_one_live "
        "ON policy_versions(status) WHERE status = 'live'"
    )


def m003_round_settings(db: sqlite_utils.Database) -> None:
    """Each training round keeps the settings it ran with (JSON; NULL for older rounds)."""
    db["training_rounds"].add_column("settings", str)


def m004_round_progress(db: sqlite_utils.Database) -> None:
    """A running round's progress (JSON: stage, done, total, eta_s, updated_at; NULL before
    its first report)."""
    db["training_rounds"].add_column("progress", str)


def m005_pair_selection_and_version_notes(db: sqlite_utils.Database) -> None:
    """Which rule chose a comparison's two answers (``comparisons.selection``: ``candidate``,
    ``variance``, ``dts``, ``random``; NULL for older rows), and why a version's status changed
    (``policy_versions.note``: e.g. the users' verdict on a candidate)."""
    db["comparisons"].add_column("selection", str)
    db["policy_versions"].add_column("note", str)


def m006_version_checksums(db: sqlite_utils.Database) -> None:
    """``policy_versions.checksum``: the SHA-256 of a version's adapter directory when it was
    published (:func:`storage.registry.tree_digest`), verified whenever it is loaded; NULL for
    versions published before."""
    db["policy_versions"].add_column("checksum", str)


def m007_replaced_replies(db: sqlite_utils.Database) -> None:
    """``messages.replaced_at``: when a regenerated reply was replaced by a new one (NULL: it
    stands). A replaced reply is kept for the record but is no longer part of its
    conversation's history (training prompts skip it)."""
    db["messages"].add_column("replaced_at", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    m001_initial_schema,
    m002_indexes,
    m003_round_settings,
    m004_round_progress,
    m005_pair_selection_and_version_notes,
    m006_version_checksums,
    m007_replaced_replies,
]


def schema_version(db: sqlite_utils.Database) -> int:
    """Highest applied migration number (0 for a fresh database)."""
    if not db[MIGRATIONS_TABLE].exists():
        return 0
    row = db.execute(f"SELECT MAX(version) FROM {MIGRATIONS_TABLE}").fetchone()
    return row[0] or 0


def migrate(db: sqlite_utils.Database) -> list[int]:
    """Apply every pending migration, each in its own transaction.

    Returns the version numbers applied by this call (empty when already up to date).
    Raises ``RuntimeError`` if the database was written by newer code than this.
    """
    db.create_table(
        MIGRATIONS_TABLE,
        {"version": int, "name": str, "applied_at": str},
        pk="version",
        not_null=["name", "applied_at"],
        if_not_exists=True,
    )
    current = schema_version(db)
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema is at version {current} but this code knows only "
            f"{len(MIGRATIONS)} migrations; upgrade the app before opening this database"
        )
    applied = []
    for number, migration in enumerate(MIGRATIONS, start=1):
        db.conn.execute("BEGIN IMMEDIATE")  # take the write lock before checking
        try:
            done = db[MIGRATIONS_TABLE].count_where("version = ?", [number])
            if not done:
                migration(db)
                db[MIGRATIONS_TABLE].insert(
                    {
                        "version": number,
                        "name": migration.__name__,
                        "applied_at": datetime.now(timezone.utc).isoformat(),
                    }
                )
                applied.append(number)
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")
    return applied
