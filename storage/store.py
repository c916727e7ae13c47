"""The chat database: conversations, messages, side-by-side comparisons and their votes.

``Store(path)`` opens (creating if needed) one SQLite file, in WAL mode with a 30 s busy
timeout and foreign keys on, applies pending migrations (``storage/migrations.py``) and gives
each thread its own connection, so Gradio workers, the scheduler and HTTP clients can use one
``Store`` concurrently. Training rounds and the policy-version registry live in
``storage/rounds.py`` and ``storage/versions.py`` and are methods of the same ``Store``.

Timestamps are ISO-8601 UTC strings (``2025-01-31T12:00:00.000000+00:00``); text is stored
exactly as given. Inspect a database with ``python -m storage stats --data-dir DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from storage.connection import (
    Connections,
    UtcClock,
    dumps,
    loads,
    normalize_timestamp,
)
from storage.errors import AlreadyVoted, UnknownComparison, UnknownConversation
from storage.migrations import migrate, schema_version
from storage.paths import DataDir, make_private_dir
from storage.rounds import RoundsMixin
from storage.versions import VersionsMixin

ROLES = ("system", "user", "assistant")
CHOICES = ("a", "b", "tie", "both_bad")


def open_store(data_dir: DataDir | str | Path = "data") -> Store:
    """Open (creating if needed) the store of a data dir (its ``chat.db``)."""
    data_dir = data_dir if isinstance(data_dir, DataDir) else DataDir(data_dir)
    return Store(data_dir.db)


def _check_messages(messages: list[dict], what: str) -> list[dict]:
    """Validate a list of chat messages and keep only ``role`` and ``content``."""
    if not isinstance(messages, list):
        raise ValueError(f"{what} must be a list of {{'role', 'content'}} dicts; got {messages!r}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
            m.get("content"), str
        ):
            raise ValueError(
                f"{what}[{i}] must be a dict with role in {ROLES} and a str content; got {m!r}"
            )
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def to_trl(pair: dict) -> dict:
    """One :meth:`Store.vote_pairs` record in TRL's conversational preference format:
    ``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}``,
    plus ``"tie"`` (true: the voter saw no difference; drop these lines for a trainer without
    ties, such as DPO) and ``"conversation_id"`` (keeps a conversation on one side of a
    held-out split)."""
    return {
        "prompt": pair["prompt"],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        "tie": pair["tie"],
        "conversation_id": pair["conversation_id"],
    }


def _decode_comparison(row: dict) -> dict:
    row = dict(row)
    for key in ("context", "sampling_a", "sampling_b"):
        row[key] = loads(row[key])
    return row


class Store(RoundsMixin, VersionsMixin):
    """All persistent state of the app in one SQLite file; safe to share between threads.

    ``path``: the database file (parent directories are created, the last one private
    (``0700``); a new database file is created ``0600``, since it holds every conversation;
    ``':memory:'`` is refused because every thread would get its own empty database).
    ``busy_timeout_s``: how long a writer waits for the lock before
    ``sqlite3.OperationalError: database is locked``.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self._connections = Connections(Path(path), busy_timeout_s)
        self.path = Path(path)
        make_private_dir(self.path.parent)
        with contextlib.suppress(FileExistsError):  # SQLite's -wal and -shm files copy its mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._clock = UtcClock()
        self._round_locks = (threading.Lock(), {})  # round id -> its held round.lock file (storage.rounds)
        db = self.db
        db.enable_wal()
        migrate(db)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        """The calling thread's ``sqlite_utils.Database`` on this file."""
        return self._connections.get()

    def close(self) -> None:
        """Close every thread's connection (the store reopens lazily if used again), fold the
        write-ahead log into ``chat.db`` (so the file alone holds everything; best effort while
        another process reads or writes it) and let go of any round lock it holds (its rounds
        then count as stale)."""
        self.release_round_locks()
        self._connections.close()
        self._connections.checkpoint()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self) -> str:
        return self._clock.now()

    def schema_version(self) -> int:
        """Number of the last applied migration."""
        return schema_version(self.db)

    # -- conversations and messages -------------------------------------------------------

    def new_conversation(self, session_id: str, system_prompt: str | None = None) -> str:
        """Start a conversation for browser session ``session_id``; returns its uuid (str)."""
        conversation_id = str(uuid.uuid4())
        self.db.table("conversations").insert(
            {
                "id": conversation_id,
                "session_id": session_id,
                "system_prompt": system_prompt,
                "created_at": self._now(),
            }
        )
        return conversation_id

    def conversation(self, conversation_id: str) -> dict:
        """One conversation row. Raises ``UnknownConversation`` (a ``KeyError``) if absent."""
        try:
            return dict(self.db.table("conversations").get(conversation_id))
        except sqlite_utils.db.NotFoundError:
            raise UnknownConversation(f"no conversation with id {conversation_id!r}") from None

    def add_message(
        self,
        conversation_id: str,
        role: str,
        content: str,
        policy_version: int | None = None,
        sampling: dict | None = None,
    ) -> int:
        """Append a message and return its id (int, increasing).

        ``role`` is ``'system' | 'user' | 'assistant'``; ``policy_version`` the version that
        generated an assistant message; ``sampling`` the JSON-able generation settings.
        Raises ``ValueError`` for a bad role or non-str content, ``UnknownConversation``.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"content must be a str; got {type(content).__name__}")
        table = self.db.table("messages")
        try:
            table.insert(
                {
                    "conversation_id": conversation_id,
                    "role": role,
                    "content": content,
                    "policy_version": policy_version,
                    "sampling": dumps(sampling),
                    "created_at": self._now(),
                }
            )
        except sqlite3.IntegrityError as e:
            raise UnknownConversation(
                f"no conversation with id {conversation_id!r}; call new_conversation() first"
            ) from e
        return int(table.last_pk)

    def replace_reply(self, message_id: int) -> None:
        """Mark assistant message ``message_id`` as replaced (the user asked for another reply):
        it stays stored but leaves its conversation's history (:meth:`messages`, :meth:`prompts`).

        Raises ``ValueError`` when there is no such assistant message or it was replaced already.
        """
        cursor = self.db.execute(
            "UPDATE messages SET replaced_at = ? WHERE id = ? AND role = 'assistant' AND replaced_at IS NULL",
            [self._now(), int(message_id)],
        )
        if cursor.rowcount != 1:
            raise ValueError(f"no standing assistant message with id {message_id}")

    def messages(self, conversation_id: str) -> list[dict]:
        """A conversation's messages in order (replaced replies left out), as dicts with ``id,
        role, content, policy_version, sampling`` (decoded) and ``created_at``.

        Raises ``UnknownConversation`` if the conversation does not exist.
        """
        rows = self.db.table("messages").rows_where(
            "conversation_id = ? AND replaced_at IS NULL",
            [conversation_id],
            select="id, role, content, policy_version, sampling, created_at",
            order_by="id",
        )
        out = [{**r, "sampling": loads(r["sampling"])} for r in rows]
        if not out:
            self.conversation(conversation_id)  # raises if unknown
        return out

    # -- comparisons and votes ------------------------------------------------------------

    def add_comparison(
        self,
        conversation_id: str,
        session_id: str,
        context: list[dict],
        answer_a: str,
        answer_b: str,
        version_a: int | None,
        version_b: int | None,
        sampling_a: dict | None,
        sampling_b: dict | None,
        selection: str | None = None,
    ) -> str:
        """Store two answers shown side by side, awaiting a vote; returns the comparison uuid.

        ``context`` is the list of ``{role, content}`` messages before the answers (other keys
        are dropped); ``selection`` names the rule that chose the pair (``candidate``,
        ``variance``, ``dts``, ``random``). Raises ``ValueError`` for malformed context or non-str answers,
        ``UnknownConversation`` if the conversation does not exist.
        """
        context = _check_messages(context, "context")
        for name, answer in (("answer_a", answer_a), ("answer_b", answer_b)):
            if not isinstance(answer, str):
                raise ValueError(f"{name} must be a str; got {type(answer).__name__}")
        comparison_id = str(uuid.uuid4())
        try:
            self.db.table("comparisons").insert(
                {
                    "id": comparison_id,
                    "conversation_id": conversation_id,
                    "session_id": session_id,
                    "context": dumps(context),
                    "answer_a": answer_a,
                    "answer_b": answer_b,
                    "version_a": version_a,
                    "version_b": version_b,
                    "sampling_a": dumps(sampling_a),
                    "sampling_b": dumps(sampling_b),
                    "choice": None,
                    "created_at": self._now(),
                    "voted_at": None,
                    "selection": selection,
                }
            )
        except sqlite3.IntegrityError as e:
            raise UnknownConversation(
                f"no conversation with id {conversation_id!r}; call new_conversation() first"
            ) from e
        return comparison_id

    def comparison(self, comparison_id: str) -> dict:
        """One comparison with ``context``/``sampling_*`` decoded; ``choice`` None if unvoted.

        Raises ``UnknownComparison`` (a ``KeyError``) if absent.
        """
        try:
            row = self.db.table("comparisons").get(comparison_id)
        except sqlite_utils.db.NotFoundError:
            raise UnknownComparison(
                f"no comparison with id {comparison_id!r}; it may have expired with its page"
            ) from None
        return _decode_comparison(row)

    def vote(self, comparison_id: str, choice: str) -> dict:
        """Record the vote ``choice`` (``'a' | 'b' | 'tie' | 'both_bad'``); returns the row.

        Atomic: of two racing votes exactly one wins. Raises ``ValueError`` for another
        choice, ``AlreadyVoted`` (a ``ValueError``) if the comparison already has a vote —
        which is kept unchanged — and ``UnknownComparison`` if it does not exist.
        """
        if choice not in CHOICES:
            raise ValueError(
                f"choice must be one of 'a', 'b', 'tie', 'both_bad'; got {choice!r}"
            )
        cursor = self.db.execute(
            "UPDATE comparisons SET choice = ?, voted_at = ? WHERE id = ? AND choice IS NULL",
            [choice, self._now(), comparison_id],
        )
        if cursor.rowcount == 0:
            first = self.comparison(comparison_id)  # raises UnknownComparison
            raise AlreadyVoted(
                f"comparison {comparison_id} was already voted {first['choice']!r} at "
                f"{first['voted_at']}; the first vote is kept"
            )
        return self.comparison(comparison_id)

    def voted_comparisons(self, after: str | None = None) -> list[dict]:
        """All voted comparisons, oldest vote first, decoded.

        ``after``: an ISO-8601 timestamp; only votes strictly later are returned.
        Raises ``ValueError`` if ``after`` is not ISO-8601.
        """
        where, params = "choice IS NOT NULL", []
        if after is not None:
            where += " AND voted_at > ?"
            params.append(normalize_timestamp(after))
        rows = self.db.table("comparisons").rows_where(where, params, order_by="voted_at, id")
        return [_decode_comparison(r) for r in rows]

    def vote_counts(self) -> dict[str, int]:
        """``{'a', 'b', 'tie', 'both_bad'}`` vote counts, ``total`` (voted) and ``pending``."""
        counts: dict[str, int] = dict.fromkeys((*CHOICES, "total", "pending"), 0)
        for choice, n in self.db.execute(
            "SELECT choice, COUNT(*) FROM comparisons GROUP BY choice"
        ):
            if choice is None:
                counts["pending"] = n
            else:
                counts[choice] = n
                counts["total"] += n
        return counts

    def candidate_tally(self, version: int) -> dict[str, dict[str, int]]:
        """Votes on comparisons that showed ``version`` against another version (the live one,
        when ``version`` is a candidate), by voter (the session that voted): ``{session:
        {"wins", "losses", "ties", "both_bad"}}`` from ``version``'s side."""
        rows = self.db.execute(
            "SELECT session_id, "
            "SUM(CASE WHEN (choice = 'a' AND version_a = :v) OR (choice = 'b' AND version_b = :v) THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN (choice = 'a' AND version_b = :v) OR (choice = 'b' AND version_a = :v) THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN choice = 'tie' THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN choice = 'both_bad' THEN 1 ELSE 0 END) "
            "FROM comparisons WHERE choice IS NOT NULL AND (version_a = :v) + (version_b = :v) = 1 "
            "GROUP BY session_id",
            {"v": version},
        ).fetchall()
        keys = ("wins", "losses", "ties", "both_bad")
        return {row[0]: dict(zip(keys, (int(x or 0) for x in row[1:]), strict=True)) for row in rows}

    def selection_counts(self) -> dict[str, int]:
        """Voted comparisons by the rule that chose their pair (``None``: rows older than the rule)."""
        rows = self.db.execute(
            "SELECT selection, COUNT(*) FROM comparisons WHERE choice IS NOT NULL GROUP BY selection")
        return {sel: n for sel, n in rows}

    def new_votes_since_last_round(self) -> int:
        """Votes cast after the start of the newest round that trained (status
        ``'succeeded'`` or ``'rejected'``); all votes if no round has trained yet."""
        since = self._last_trained_round_start()
        if since is None:
            sql, params = "SELECT COUNT(*) FROM comparisons WHERE choice IS NOT NULL", []
        else:
            sql = "SELECT COUNT(*) FROM comparisons WHERE choice IS NOT NULL AND voted_at > ?"
            params = [since]
        return self.db.execute(sql, params).fetchone()[0]

    # -- training data --------------------------------------------------------------------

    def vote_pairs(self) -> list[dict]:
        """The votes as training pairs: exactly what a round's reward model trains on, the
        export writes and ``storage stats`` counts. Oldest vote first.

        One ``{"comparison_id", "conversation_id", "prompt", "chosen", "rejected", "tie",
        "chosen_version", "rejected_version", "voter"}`` per usable vote: ``prompt`` is the context
        (``{role, content}`` messages), ``chosen``/``rejected`` the two answers (str) and their
        policy versions, ``voter`` the session that voted (:mod:`training.voters`). A vote for A or B makes that answer chosen; a tie keeps A as chosen
        with ``tie`` True (the order then carries no preference). "Both bad" votes and pairs
        whose two answers are the same text (surrounding whitespace aside) teach nothing and
        are left out.
        """
        pairs = []
        for row in self.db.table("comparisons").rows_where(
            "choice IN ('a', 'b', 'tie')",
            select="id, conversation_id, session_id, context, answer_a, answer_b, version_a, version_b, choice",
            order_by="voted_at, id",
        ):
            if row["answer_a"].strip() == row["answer_b"].strip():
                continue
            flip = row["choice"] == "b"
            pairs.append({
                "comparison_id": row["id"],
                "conversation_id": row["conversation_id"],
                "prompt": loads(row["context"]),
                "chosen": row["answer_b"] if flip else row["answer_a"],
                "rejected": row["answer_a"] if flip else row["answer_b"],
                "tie": row["choice"] == "tie",
                "chosen_version": row["version_b"] if flip else row["version_a"],
                "rejected_version": row["version_a"] if flip else row["version_b"],
                "voter": row["session_id"],
            })
        return pairs

    def export_jsonl(self, path_or_fileobj: str | Path | IO[str]) -> int:
        """Write :meth:`vote_pairs` as JSON lines (UTF-8, non-ASCII kept) in TRL's conversational
        preference format (:func:`to_trl`); returns the count.

        A path is written atomically (temp file, then rename); a text file object is written
        to as is and left open.
        """
        pairs = self.vote_pairs()
        lines = "".join(json.dumps(to_trl(p), ensure_ascii=False) + "\n" for p in pairs)
        if hasattr(path_or_fileobj, "write"):
            path_or_fileobj.write(lines)
            return len(pairs)
        path = Path(path_or_fileobj)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(lines, encoding="utf-8", newline="\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return len(pairs)

    def prompts(self, limit: int | None = None) -> list[dict]:
        """Training prompts from stored chats, newest first, at most ``limit``.

        One ``{"conversation_id", "messages"}`` per user message, where ``messages`` is the
        conversation up to and including it (``{role, content}`` only; the conversation's
        system prompt first if it has one). Identical message sequences appear once.
        """
        rows = self.db.execute(
            "SELECT m.id, m.conversation_id, m.role, m.content, c.system_prompt "
            "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.replaced_at IS NULL ORDER BY m.conversation_id, m.id"
        )
        candidates: list[tuple[int, str, list[dict[str, Any]]]] = []
        conversation_id, history = None, []
        for message_id, conv_id, role, content, system_prompt in rows:
            if conv_id != conversation_id:
                conversation_id = conv_id
                history = [{"role": "system", "content": system_prompt}] if system_prompt else []
            history.append({"role": role, "content": content})
            if role == "user":
                candidates.append((message_id, conv_id, list(history)))
        candidates.sort(key=lambda c: c[0], reverse=True)
        out, seen = [], set()
        for _, conv_id, messages in candidates:
            key = tuple((m["role"], m["content"]) for m in messages)
            if key in seen:
                continue
            seen.add(key)
            out.append({"conversation_id": conv_id, "messages": [dict(m) for m in messages]})
            if limit is not None and len(out) >= limit:
                break
        return out
