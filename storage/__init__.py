"""Storage layer: SQLite (through sqlite-utils) for chats, votes, rounds and policy versions,
the data-dir layout, and the on-disk registries of adapters and reward models. Knows nothing of
torch or Gradio.

    from storage.paths import DataDir
    from storage.store import open_store
    store = open_store(DataDir("data"))   # data/chat.db, migrated, WAL, per-thread connections

Modules: ``paths`` (every path under the data dir), ``store`` (the ``Store``), ``migrations``,
``connection``, ``rounds`` and ``versions`` (parts of the ``Store``), ``registry`` (published
adapters and reward models), ``errors``, ``cli`` (``python -m storage export|stats|...``).
"""
