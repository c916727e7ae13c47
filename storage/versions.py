"""Registry of policy versions: which adapter directories exist and which one is live.

Each version is one row in ``policy_versions`` with status ``'live' | 'candidate' |
'rejected' | 'retired'`` (candidate: passed the automatic gate, waiting for users' votes;
retired: was live once) and a ``note`` saying why its status last changed. Exactly one version is live once any has been made live: a partial
unique index forbids two, and ``set_live`` retires the previous one in the same transaction.
Mixed into ``storage.store.Store``; uses its ``db`` (per-thread handle) and ``_now()``.
"""

from __future__ import annotations

import sqlite_utils

from storage.connection import decode_metrics, dumps, write_transaction
from storage.errors import RejectedVersion, UnknownRound, UnknownVersion

VERSION_STATUSES = ("live", "candidate", "rejected", "retired")


class VersionsMixin:
    """Methods on ``Store`` for the ``policy_versions`` table."""

    db: sqlite_utils.Database

    def _now(self) -> str:  # provided by Store
        raise NotImplementedError

    def register_version(
        self,
        version: int,
        path: str,
        parent: int | None = None,
        round_id: int | None = None,
        metrics: dict | None = None,
        status: str = "candidate",
        checksum: str | None = None,
    ) -> dict:
        """Record a policy version stored at ``path`` and return its row.

        ``parent`` is the version it was trained from (``None`` for the base/starter),
        ``round_id`` the training round that produced it, ``metrics`` a JSON-able dict,
        ``checksum`` the SHA-256 of its directory (verified when it is loaded).
        With ``status='live'`` the previous live version is retired atomically.
        Raises ``ValueError`` for a negative or already registered version or an unknown
        status, ``UnknownRound`` for an unknown ``round_id``.
        """
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0; got {version!r}")
        if status not in VERSION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(VERSION_STATUSES)}; got {status!r}")
        with write_transaction(self.db) as db:
            if db.table("policy_versions").count_where("version = ?", [version]):
                raise ValueError(
                    f"policy version {version} is already registered; use next_version() "
                    "to pick a free number"
                )
            if round_id is not None and not db.table("training_rounds").count_where(
                "id = ?", [round_id]
            ):
                raise UnknownRound(f"no training round with id {round_id!r}")
            if status == "live":
                db.execute("UPDATE policy_versions SET status = 'retired' WHERE status = 'live'")
            db.table("policy_versions").insert(
                {
                    "version": version,
                    "path": str(path),
                    "parent": parent,
                    "round_id": round_id,
                    "metrics": dumps(metrics),
                    "status": status,
                    "created_at": self._now(),
                    "checksum": checksum,
                }
            )
        return self.version(version)

    def version(self, version: int) -> dict:
        """One version's row (``metrics`` decoded). Raises ``UnknownVersion`` if absent."""
        try:
            row = self.db.table("policy_versions").get(version)
        except sqlite_utils.db.NotFoundError:
            raise UnknownVersion(
                f"no policy version {version!r} is registered; known: {self._known_versions()}"
            ) from None
        return decode_metrics(row)

    def versions(self) -> list[dict]:
        """All registered versions, oldest (lowest number) first."""
        rows = self.db.table("policy_versions").rows_where(order_by="version")
        return [decode_metrics(r) for r in rows]

    def live_version(self) -> int | None:
        """The version currently served, or ``None`` before any was made live."""
        row = self.db.execute(
            "SELECT version FROM policy_versions WHERE status = 'live'"
        ).fetchone()
        return None if row is None else row[0]

    def next_version(self) -> int:
        """The number for the next version: highest registered + 1, or 0 when none."""
        row = self.db.execute("SELECT MAX(version) FROM policy_versions").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def set_live(self, version: int) -> dict:
        """Serve ``version`` from now on; the previous live version becomes ``'retired'``.

        Works for rollback to any earlier version that was not rejected. Returns the row.
        Raises ``UnknownVersion`` if not registered, ``RejectedVersion`` (a ``KeyError`` and a
        ``ValueError``) if its status is ``'rejected'``.
        """
        with write_transaction(self.db) as db:
            row = self.version(version)
            if row["status"] == "rejected":
                raise RejectedVersion(
                    f"policy version {version} was rejected and cannot be served; pick a "
                    "non-rejected version, or set_version_status(v, 'candidate') first"
                )
            if row["status"] != "live":
                db.execute("UPDATE policy_versions SET status = 'retired' WHERE status = 'live'")
                db.execute(
                    "UPDATE policy_versions SET status = 'live' WHERE version = ?", [version]
                )
        return self.version(version)

    def set_version_status(self, version: int, status: str) -> dict:
        """Change a version's status and return its row; ``'live'`` goes through ``set_live``.

        Raises ``UnknownVersion`` if not registered, ``ValueError`` for an unknown status or
        for demoting the live version (make another version live first, so one always is).
        """
        if status not in VERSION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(VERSION_STATUSES)}; got {status!r}")
        if status == "live":
            return self.set_live(version)
        with write_transaction(self.db) as db:
            row = self.version(version)
            if row["status"] == "live":
                raise ValueError(
                    f"policy version {version} is live; set_live(another_version) before "
                    f"marking it {status!r}"
                )
            db.execute(
                "UPDATE policy_versions SET status = ? WHERE version = ?", [status, version]
            )
        return self.version(version)

    def candidate_version(self) -> int | None:
        """The newest version waiting for users' votes (status ``'candidate'``), or ``None``."""
        row = self.db.execute(
            "SELECT MAX(version) FROM policy_versions WHERE status = 'candidate'"
        ).fetchone()
        return row[0]

    def decide_candidate(self, version: int, promote: bool, note: str = "") -> bool:
        """Settle a candidate once: ``promote`` makes it live (the live version is retired),
        else it is marked ``'rejected'``; ``note`` (why) is kept on its row. Atomic and
        first-wins: a version no longer ``'candidate'`` (already decided, by users or an admin)
        is left as it is and False is returned.

        Raises ``UnknownVersion`` if not registered.
        """
        with write_transaction(self.db) as db:
            if self.version(version)["status"] != "candidate":
                return False
            if promote:
                db.execute("UPDATE policy_versions SET status = 'retired' WHERE status = 'live'")
            db.execute(
                "UPDATE policy_versions SET status = ?, note = ? WHERE version = ?",
                ["live" if promote else "rejected", note, version],
            )
        return True

    def quarantine_version(self, version: int, fallback: int | None, note: str) -> None:
        """Take ``version`` out of service for good: it becomes ``'rejected'`` with ``note`` (why:
        damaged files, non-finite weights), and ``fallback`` (when given) is made live in the
        same transaction, the previous live version retired. With ``fallback=None`` no version
        is live afterwards (the caller publishes a fresh one).

        Raises ``UnknownVersion`` if either is not registered.
        """
        with write_transaction(self.db) as db:
            self.version(version)
            if fallback is not None:
                self.version(fallback)
                db.execute("UPDATE policy_versions SET status = 'retired' WHERE status = 'live'")
                db.execute("UPDATE policy_versions SET status = 'live' WHERE version = ?", [fallback])
            db.execute("UPDATE policy_versions SET status = 'rejected', note = ? WHERE version = ?", [note, version])

    def _known_versions(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT version FROM policy_versions ORDER BY 1")]
