"""Adapter directories on disk, published atomically and recorded in the store.

Layout under ``root``::

    root/.staging/round-xxxx/   a round writes its adapter here (same filesystem as root)
    root/v0/, root/v1/, ...     published versions; each appears complete or not at all

``publish`` fsyncs the staging directory, renames it to ``root/v{N}`` (the rename is the
commit point) and registers version ``N`` in the store. Knows nothing of torch: an adapter is
complete when it holds ``adapter_config.json`` and a ``*.safetensors`` file.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

from storage.db import Store

STAGING_DIRNAME = ".staging"


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    """Versioned adapter directories under ``root`` backed by ``store``'s policy registry.

    ``root`` is created if missing. Thread-safe within one process.
    """

    def __init__(self, root: str | Path, store: Store):
        self.root = Path(root).resolve()  # versions are registered by absolute path
        self.store = store
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def staging_root(self) -> Path:
        """``root/.staging``: where rounds write before publishing."""
        return self.root / STAGING_DIRNAME

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """True if ``path`` is a directory with ``adapter_config.json`` and a ``*.safetensors``."""
        path = Path(path)
        return (path / "adapter_config.json").is_file() and any(
            p.is_file() for p in path.glob("*.safetensors")
        )

    def staging_dir(self) -> Path:
        """A fresh, empty directory under ``root/.staging/`` for one round's output."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="round-", dir=self.staging_root))

    def publish(
        self,
        staging: str | Path,
        parent: int | None = None,
        round_id: int | None = None,
        metrics: dict | None = None,
        live: bool = True,
    ) -> int:
        """Move a complete staging dir to ``root/v{N}``, register it, and return ``N``.

        ``N`` is ``store.next_version()``, or the next number whose directory is free (a
        ``v{N}`` left by a crash between rename and register is skipped, never overwritten).
        With ``live=True`` the new version is served and the previous live one retired, in
        one transaction; otherwise it is registered as ``'candidate'``.
        Raises ``ValueError`` if ``staging`` is not a directory under ``root/.staging`` or is
        incomplete. If registering fails the directory is moved back to ``staging``.
        """
        staging = self._check_staging(Path(staging))
        if not self.is_complete(staging):
            raise ValueError(
                f"{staging} is not a complete adapter (needs adapter_config.json and a "
                "*.safetensors file); save the model with save_pretrained() before publishing"
            )
        _fsync_tree(staging)
        with self._lock:
            number = self.store.next_version()
            while True:
                target = self.root / f"v{number}"
                if target.exists():
                    number += 1
                    continue
                try:
                    os.rename(staging, target)  # atomic; fails if target is a non-empty dir
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        number += 1
                        continue
                    raise
                break
            _fsync_dir(self.root)
            try:
                self.store.register_version(
                    number,
                    str(target),
                    parent=parent,
                    round_id=round_id,
                    metrics=metrics,
                    status="live" if live else "candidate",
                )
            except BaseException:
                os.rename(target, staging)
                raise
        return number

    def path(self, version: int) -> Path:
        """Directory of a registered version.

        The registered absolute path, or ``root/<its name>`` if the data folder was moved.
        Raises ``UnknownVersion`` (a ``KeyError``) if not registered, ``FileNotFoundError``
        if its directory has gone missing.
        """
        path = Path(self.store.version(version)["path"])
        if path.is_dir():
            return path
        moved = self.root / path.name  # the data folder was moved or mounted elsewhere
        if moved.is_dir():
            return moved
        raise FileNotFoundError(
            f"policy version {version} is registered at {path}, which does not exist (nor "
            f"{moved}); restore the directory or set_live() another version"
        )

    def live_path(self) -> Path | None:
        """Directory of the live version, or ``None`` when no version is live yet."""
        live = self.store.live_version()
        return None if live is None else self.path(live)

    def discard(self, staging: str | Path) -> None:
        """Delete a staging directory (e.g. after a skipped or failed round); no-op if gone."""
        staging = Path(staging)
        if not staging.exists():
            return
        shutil.rmtree(self._check_staging(staging))

    def clean_staging(self) -> int:
        """Delete everything under ``root/.staging`` left by crashed rounds; returns the count.

        Call at startup, when no round is running.
        """
        if not self.staging_root.is_dir():
            return 0
        removed = 0
        for entry in self.staging_root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        return removed

    def _check_staging(self, staging: Path) -> Path:
        """Resolve ``staging`` and insist it is a directory directly under the staging root."""
        resolved = staging.resolve()
        if resolved.parent != self.staging_root.resolve() or not resolved.is_dir():
            raise ValueError(
                f"{staging} is not a staging directory of this registry; get one from "
                f"staging_dir() (under {self.staging_root})"
            )
        return resolved
