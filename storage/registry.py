"""Published directories under the data dir: policy adapters and reward models.

Both are published the same way (:class:`StagedDirs`): a round writes into a fresh directory
under ``ROOT/.staging/`` (same filesystem as ROOT); publishing fsyncs it and renames it to
``ROOT/<name>`` (the rename is the commit point), so a directory appears complete or not at all,
and whatever a killed round left in staging is deleted (:func:`clean_staging`).

    DATA/adapters/v0, v1, ...   policy versions, registered in the store (AdapterRegistry)
    DATA/reward/r1, r2, ...     reward models, the newest is the one in use (RewardModelRegistry)

Knows nothing of torch: a directory is complete when it holds ``adapter_config.json`` and a
``*.safetensors`` file (a reward model is an adapter plus its head).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from storage.errors import RoundOwnedElsewhere
from storage.paths import STAGING_DIRNAME, DataDir
from storage.store import Store


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


class CorruptAdapter(ValueError):
    """A published adapter's files no longer match the checksum recorded when it was published."""


def tree_digest(path: str | Path) -> str:
    """SHA-256 (hex) of every file under ``path``: each file's path relative to ``path`` (POSIX,
    sorted) and its bytes, so a flipped bit, a truncated, added, removed or renamed file all
    change it."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def is_complete(path: str | Path) -> bool:
    """True if ``path`` is a directory with ``adapter_config.json`` and a ``*.safetensors``."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and any(p.is_file() for p in path.glob("*.safetensors"))


class StagedDirs:
    """Directories under ``root`` that are written in ``root/.staging/`` and renamed into place.

    ``root`` is created if missing. Thread-safe within one process; across processes the
    rename never overwrites (a taken name moves on to the next number).
    """

    def __init__(self, root: str | Path, prefix: str):
        self.root = Path(os.path.abspath(root))  # symlinks kept: paths stay under the data dir
        self.prefix = prefix  # published names are f"{prefix}{number}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()  # re-entrant: a caller may hold it around publish()

    @property
    def staging_root(self) -> Path:
        """``root/.staging``: where rounds write before publishing."""
        return self.root / STAGING_DIRNAME

    def staging_dir(self) -> Path:
        """A fresh, empty directory under ``root/.staging/`` for one round's output."""
        self.staging_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="round-", dir=self.staging_root))

    def path(self, number: int) -> Path:
        """``root/{prefix}{number}``: where number ``number`` is published."""
        return self.root / f"{self.prefix}{number}"

    def numbers(self) -> list[int]:
        """Numbers of the published directories, ascending."""
        pattern = re.compile(rf"{re.escape(self.prefix)}(\d+)")
        found = [pattern.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def publish(self, staging: str | Path, first: int, commit: Callable[[int, Path], None] | None = None) -> tuple[int, Path]:
        """Rename a complete staging dir to ``root/{prefix}{N}``; returns ``(N, path)``.

        ``N`` is ``first``, or the next number whose directory is free (never overwritten).
        ``commit(N, path)`` runs after the rename, under the lock; if it raises, the directory
        is moved back to ``staging`` and the error propagates.

        Raises:
            ValueError: ``staging`` is not a directory under ``root/.staging`` or is incomplete.
        """
        staging = self.check_staging(Path(staging))
        if not is_complete(staging):
            raise ValueError(
                f"{staging} is not complete (needs adapter_config.json and a *.safetensors file); "
                "save the model with save_pretrained() before publishing"
            )
        _fsync_tree(staging)
        with self.lock:
            number = first
            while True:
                target = self.path(number)
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
            if commit is not None:
                try:
                    commit(number, target)
                except BaseException:
                    os.rename(target, staging)
                    raise
        return number, target

    def discard(self, staging: str | Path) -> None:
        """Delete a staging directory (e.g. after a skipped or failed round); no-op if gone."""
        staging = Path(staging)
        if staging.exists():
            shutil.rmtree(self.check_staging(staging))

    def clean_staging(self) -> int:
        """Delete everything under ``root/.staging``; returns the count. Only when no round runs."""
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

    def check_staging(self, staging: Path) -> Path:
        """Resolve ``staging`` and insist it is a directory directly under the staging root.

        Raises:
            ValueError: it is not.
        """
        resolved = staging.resolve()
        if resolved.parent != self.staging_root.resolve() or not resolved.is_dir():
            raise ValueError(
                f"{staging} is not a staging directory here; get one from staging_dir() (under "
                f"{self.staging_root})"
            )
        return resolved


def clean_staging(data_dir: DataDir) -> int:
    """Delete what killed rounds left in the staging areas of adapters and reward models;
    returns how many entries were removed. Call only when no round is running."""
    return sum(
        StagedDirs(root, "").clean_staging()
        for root in (data_dir.adapters, data_dir.reward_models)
        if root.is_dir()
    )


class RewardModelRegistry:
    """Reward models under ``DATA/reward/``: ``r{N}/``, the newest in use; older ones beyond
    ``keep`` are deleted after each publish."""

    def __init__(self, data_dir: DataDir, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the reward model in use), got {keep}")
        self.dirs = StagedDirs(data_dir.reward_models, "r")
        self.keep = keep

    def staging_dir(self) -> Path:
        """A fresh staging directory for one round's reward model."""
        return self.dirs.staging_dir()

    def discard(self, staging: str | Path) -> None:
        """Delete an unpublished staging directory."""
        self.dirs.discard(staging)

    def latest(self) -> Path | None:
        """Directory of the newest complete reward model, or ``None`` before the first (a data
        dir written before numbered reward models keeps its one in ``reward/latest``)."""
        for number in reversed(self.dirs.numbers()):
            path = self.dirs.path(number)
            if is_complete(path):
                return path
        legacy = self.dirs.root / "latest"
        return legacy if is_complete(legacy) else None

    def publish(self, staging: str | Path) -> Path:
        """Make a complete staging dir the reward model in use; returns its directory.

        Raises:
            ValueError: see :meth:`StagedDirs.publish`.
        """
        numbers = self.dirs.numbers()
        _, target = self.dirs.publish(staging, (numbers[-1] + 1) if numbers else 1)
        for number in self.dirs.numbers()[: -self.keep]:
            shutil.rmtree(self.dirs.path(number), ignore_errors=True)
        return target


class AdapterRegistry:
    """Policy versions: adapter directories ``DATA/adapters/v{N}`` registered in ``store``.

    The store keeps each version's path relative to the data dir, so a copied or moved data
    dir serves its own adapters. Thread-safe within one process.
    """

    def __init__(self, data_dir: DataDir, store: Store):
        self.data_dir = data_dir
        self.store = store
        self.dirs = StagedDirs(data_dir.adapters, "v")

    @property
    def root(self) -> Path:
        """``DATA/adapters``."""
        return self.dirs.root

    def staging_dir(self) -> Path:
        """A fresh, empty directory under ``DATA/adapters/.staging/`` for one round's output."""
        return self.dirs.staging_dir()

    def discard(self, staging: str | Path) -> None:
        """Delete an unpublished staging directory; no-op if gone."""
        self.dirs.discard(staging)

    def publish(
        self,
        staging: str | Path,
        parent: int | None = None,
        round_id: int | None = None,
        metrics: dict | None = None,
        live: bool = True,
    ) -> int:
        """Move a complete staging dir to ``DATA/adapters/v{N}``, register it, and return ``N``.

        ``N`` is ``store.next_version()``, or the next number whose directory is free (a
        ``v{N}`` left by a crash between rename and register is skipped, never overwritten).
        With ``live=True`` the new version is served and the previous live one retired, in
        one transaction; otherwise it is registered as ``'candidate'``. A ``round_id`` must be
        the running round this store holds (:meth:`storage.store.Store.owns_round`).
        Raises ``ValueError`` if ``staging`` is not a directory under the staging root or is
        incomplete, ``RoundOwnedElsewhere`` if ``round_id`` is not this store's running round.
        If registering fails the directory is moved back to ``staging``.
        """

        checksum = tree_digest(self.dirs.check_staging(Path(staging)))

        def register(number: int, target: Path) -> None:
            if round_id is not None and not self.store.owns_round(round_id):
                raise RoundOwnedElsewhere(f"round {round_id} is not this process's running round (it ended or another "
                                          "process runs it): its adapter is not published")
            self.store.register_version(
                number, self.data_dir.relative(target), parent=parent, round_id=round_id,
                metrics=metrics, status="live" if live else "candidate", checksum=checksum,
            )  # fmt: skip

        with self.dirs.lock:  # next_version() and the rename are one step
            number, _ = self.dirs.publish(staging, self.store.next_version(), commit=register)
        return number

    def path(self, version: int, verify: bool = True) -> Path:
        """Directory of a registered version, under this data dir; with ``verify`` its files are
        checked against the checksum recorded at publishing (a version published before
        checksums existed has none to check).

        Raises ``UnknownVersion`` (a ``KeyError``) if not registered, ``FileNotFoundError``
        if its directory has gone missing, ``CorruptAdapter`` if its files changed.
        """
        row = self.store.version(version)
        stored = row["path"]
        path = self.data_dir.resolve(stored)
        if path.is_dir():
            if verify and row.get("checksum") and tree_digest(path) != row["checksum"]:
                raise CorruptAdapter(f"policy version {version} ({stored}) does not match the checksum recorded "
                                     "when it was published: its files were changed or damaged")
            return path
        raise FileNotFoundError(
            f"policy version {version} is registered at {stored}, which is not in {self.data_dir.root}; "
            "restore the directory or set_live() another version"
        )
