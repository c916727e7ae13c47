"""Storage layer: SQLite (through sqlite-utils) for chats, votes, rounds and policy versions,
plus the on-disk registry of adapter directories. Knows nothing of torch or Gradio.

    from storage import open_store, AdapterRegistry
    store = open_store("data")            # data/chat.db, migrated, WAL, per-thread connections

Command line: ``python -m storage export|stats --data-dir DIR`` (see ``storage/cli.py``).
"""

from storage.db import CHOICES, DB_FILENAME, ROLES, Store, open_store
from storage.errors import (
    AlreadyVoted,
    RejectedVersion,
    RoundAlreadyRunning,
    UnknownComparison,
    UnknownConversation,
    UnknownRound,
    UnknownVersion,
)
from storage.registry import AdapterRegistry

__all__ = [
    "CHOICES",
    "DB_FILENAME",
    "ROLES",
    "AdapterRegistry",
    "AlreadyVoted",
    "RejectedVersion",
    "RoundAlreadyRunning",
    "Store",
    "UnknownComparison",
    "UnknownConversation",
    "UnknownRound",
    "UnknownVersion",
    "open_store",
]
