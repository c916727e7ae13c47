"""Registry of policy versions: which adapter directories exist and which one is live.

Each version is one row in ``policy_versions`` with status ``'live' | 'candidate' |
'rejected' | 'retired'`` (candidate: passed the automatic gate, waiting for users' votes;
retired: was live once) and a ``note`` saying why its status last changed. Exactly one version is live once any has been made live: a partial
unique index forbids two, and ``set_live`` retires the previous one in the same transaction.
Mixed into ``storage.store.Store``; uses its ``db`` (per-thread handle) and ``_now()``.

**What a version changed** (:func:`write_changes`, :func:`version_changes`): a few held-out
prompts with the previous version's and the new version's answer, side by side, kept with the
version. A round's gate samples both versions on held-out prompts
(:func:`training.gate.run_gate`); the first few of those rows are written as ``changes.json``
into the adapter's staging directory before it is published, so the file is renamed into place
with the adapter and covered by the version's checksum like every other file of it
(:func:`storage.registry.tree_digest`): a version appears with its changes or not at all, and a
changed file takes the version out of service like a changed weight. Version 0, versions
published before this file existed and rounds run without the gate have none::

    {"format": 1, "before_version": 3,
     "changes": [{"messages": [{"role": "user", "content": "..."}], "before": "...", "after": "...",
                  "before_reward": 0.12, "after_reward": 0.57}, ...]}

Texts are data: stored and returned exactly as sampled (no escaping; that is the display's job).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


CHANGES_FILE = "changes.json"
CHANGES_FORMAT = 1


def _check_entry(i: int, entry: dict) -> dict:
    """One entry, validated and reduced to its known keys.

    Raises:
        ValueError: missing or mistyped fields.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"change {i} must be a dict, got {type(entry).__name__}")
    messages = entry.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise ValueError(f"change {i}: 'messages' must be a non-empty list of {{role, content}} strings")
    for key in ("before", "after"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"change {i}: {key!r} must be a string (the answer), got {type(entry.get(key)).__name__}")
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
           "before": entry["before"], "after": entry["after"]}
    for key in ("before_reward", "after_reward"):
        value = entry.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"change {i}: {key!r} must be a number or None, got {value!r}")
            out[key] = float(value) if math.isfinite(value) else None
    return out


def write_changes(directory: str | Path, before_version: int, changes: list[dict]) -> Path:
    """Write ``directory/changes.json``: ``changes`` (each ``{"messages", "before", "after"}``
    and optionally ``"before_reward"``, ``"after_reward"``; :class:`training.gate.GateResult`
    ``samples``) against version ``before_version`` (the one live when the round started).
    Call it on a staging directory before publishing, so the checksum covers it. Returns the
    file's path.

    Raises:
        ValueError: ``before_version`` is not an int >= 0, or an entry lacks a field or has a
            mistyped one.
    """
    if isinstance(before_version, bool) or not isinstance(before_version, int) or before_version < 0:
        raise ValueError(f"before_version must be an int >= 0, got {before_version!r}")
    entries = [_check_entry(i, e) for i, e in enumerate(changes)]
    path = Path(directory) / CHANGES_FILE
    text = json.dumps({"format": CHANGES_FORMAT, "before_version": before_version, "changes": entries},
                      ensure_ascii=False, allow_nan=False, indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_changes(directory: str | Path, version: int) -> list[dict]:
    """The changes kept in ``directory`` (version ``version``'s adapter directory), as
    :func:`version_changes` returns them; ``[]`` when it holds no ``changes.json``.

    Raises:
        ValueError: the file is not valid JSON of this format.
    """
    path = Path(directory) / CHANGES_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != CHANGES_FORMAT or not isinstance(data.get("changes"), list):
        raise ValueError(f"{path} is not a changes file of format {CHANGES_FORMAT}")
    before = data.get("before_version")
    if isinstance(before, bool) or not isinstance(before, int):
        raise ValueError(f"{path}: 'before_version' must be an int, got {before!r}")
    out = []
    for i, raw in enumerate(data["changes"]):
        entry = _check_entry(i, raw)
        users = [m["content"] for m in entry["messages"] if m["role"] == "user"]
        out.append({
            "prompt": users[-1] if users else "",
            "messages": entry["messages"],
            "before": entry["before"], "before_version": before, "before_reward": entry.get("before_reward"),
            "after": entry["after"], "after_version": version, "after_reward": entry.get("after_reward"),
        })
    return out


def version_changes(registry, version: int) -> list[dict]:
    """What version ``version`` changed, on a few held-out prompts: one ``{"prompt": the last
    user message (str), "messages": the whole prompt ({role, content} list), "before": the
    previous version's answer, "before_version": int, "before_reward": float | None, "after":
    this version's answer, "after_version": ``version``, "after_reward": float | None}`` per
    prompt (rewards: the round's reward model's raw scores), in the order the gate sampled them;
    ``[]`` when the version kept none (version 0, older versions, rounds without the gate).

    ``registry`` is the data dir's :class:`storage.registry.AdapterRegistry`. The files are not
    checksummed here (serving does that when it loads the version).

    Raises:
        storage.errors.UnknownVersion (a ``KeyError``): ``version`` is not registered.
        FileNotFoundError: its directory is gone.
        ValueError: its ``changes.json`` is damaged.
    """
    return read_changes(registry.path(version, verify=False), version)
