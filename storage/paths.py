"""The data dir: every path under ``--data-dir``, and which base model it belongs to.

One data dir holds one app's whole state::

    DATA/chat.db                  conversations, votes, rounds, policy versions (storage.store)
    DATA/adapters/v0, v1, ...     published policy adapters (storage.registry.AdapterRegistry)
    DATA/adapters/.staging/       adapters being written by a round
    DATA/reward/r1, r2, ...       published reward models (storage.registry.RewardModelRegistry)
    DATA/reward/.staging/         reward models being written by a round
    DATA/starter/                 the offline starter model, when no --model is given
    DATA/logs/training.log        the training child's output
    DATA/logs/app.log             the app's output when a benchmark runs it
    DATA/scheduler.lock           flock of the one scheduler of this data dir
    DATA/round.lock               flock held by the process running a training round
    DATA/model.json               the base model the adapters were trained on

Adapters fit only the base they were trained on, so a data dir records its base model once
(:meth:`DataDir.record_model`) and refuses another (:meth:`DataDir.check_model`). Paths kept
in the database are relative to the data dir (:meth:`DataDir.relative`), so a data dir that is
copied or moved works on its own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STAGING_DIRNAME = ".staging"
STARTER_IDENTITY = "starter"  # how the offline starter is recorded as a data dir's base model


def make_private_dir(path: Path) -> None:
    """Create directory ``path`` (and its parents) if missing, the last one ``0700``: a data dir
    holds every user's conversations, readable by the app's user only."""
    Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)


class DataDirError(ValueError):
    """The data dir is missing, not an app's data dir, or belongs to another base model."""


class DataDir:
    """The paths under one data dir (made absolute, so the working directory does not matter).

    Nothing is created by constructing one; :meth:`require` checks that it exists.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"DataDir({str(self.root)!r})"

    # -- the layout ------------------------------------------------------------------------

    @property
    def db(self) -> Path:
        """The SQLite database file."""
        return self.root / "chat.db"

    @property
    def adapters(self) -> Path:
        """Published policy adapters ``v{N}/`` and their ``.staging/``."""
        return self.root / "adapters"

    @property
    def reward_models(self) -> Path:
        """Published reward models ``r{N}/`` and their ``.staging/``."""
        return self.root / "reward"

    @property
    def starter(self) -> Path:
        """The offline starter model (built on first use)."""
        return self.root / "starter"

    @property
    def logs(self) -> Path:
        """Log files."""
        return self.root / "logs"

    @property
    def training_log(self) -> Path:
        """Output of the training child processes (appended)."""
        return self.logs / "training.log"

    @property
    def app_log(self) -> Path:
        """Output of an app a benchmark runs on this data dir."""
        return self.logs / "app.log"

    @property
    def scheduler_lock(self) -> Path:
        """The file whose ``flock`` makes one scheduler the owner of this data dir."""
        return self.root / "scheduler.lock"

    @property
    def round_lock(self) -> Path:
        """The file whose ``flock`` the process running a training round holds (storage.rounds)."""
        return self.root / "round.lock"

    @property
    def model_marker(self) -> Path:
        """JSON ``{"model": identity}`` of the base model this data dir belongs to."""
        return self.root / "model.json"

    # -- paths kept in the database ---------------------------------------------------------

    def relative(self, path: str | Path) -> str:
        """``path`` (under the data dir) as stored in the database: relative, POSIX style.

        Raises:
            ValueError: ``path`` is not under the data dir.
        """
        absolute = Path(os.path.abspath(Path(path).expanduser()))  # a symlinked adapters/ stays inside
        try:
            return absolute.relative_to(self.root).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not under the data dir {self.root}") from None

    def resolve(self, stored: str) -> Path:
        """A path from the database as a path under this data dir. A relative path is taken
        from the data dir; an absolute one (written by older versions) is kept when it is under
        this data dir, else its last two parts are looked up here (``adapters/v3``), so a copied
        data dir never reaches back into the one it was copied from."""
        path = Path(stored)
        if not path.is_absolute():
            return self.root / path
        try:
            path.relative_to(self.root)
            return path
        except ValueError:
            return self.root.joinpath(*path.parts[1:][-2:])

    # -- the base model --------------------------------------------------------------------

    def model_identity(self, model: str) -> str:
        """How base model ``model`` is recorded: ``"starter"`` for this data dir's starter (or
        an empty ``model``), a local directory as its absolute path, a hub id as given."""
        if not model:
            return STARTER_IDENTITY
        path = Path(model).expanduser()
        if path.exists():
            resolved = path.resolve()
            return STARTER_IDENTITY if resolved in self._starter_paths() else str(resolved)
        return model

    def _starter_paths(self) -> set[Path]:
        """The starter's directory, as given and with symlinks resolved."""
        return {self.starter, self.starter.resolve()}

    def recorded_model(self) -> str | None:
        """The identity in ``model.json``, or ``None`` before any model was recorded.

        Raises:
            DataDirError: ``model.json`` is not valid JSON.
        """
        if not self.model_marker.is_file():
            return None
        try:
            return json.loads(self.model_marker.read_text()).get("model")
        except (ValueError, AttributeError) as exc:
            raise DataDirError(f"{self.model_marker} is not valid JSON ({exc}); restore or delete it") from None

    def check_model(self, model: str) -> None:
        """Refuse a base model other than the one this data dir's adapters were trained on.

        Raises:
            DataDirError: the data dir records another base model.
        """
        identity = self.model_identity(model)
        recorded = self.recorded_model()
        if recorded is not None and Path(recorded) in self._starter_paths():
            recorded = STARTER_IDENTITY  # recorded as a path when --model named the starter
        if recorded is not None and recorded != identity:
            raise DataDirError(
                f"{self.root} holds adapters for model {recorded!r}, not {identity!r}; pass "
                "another --data-dir for this model (or the model it was made for)"
            )

    def record_model(self, model: str) -> None:
        """Tie the data dir to base model ``model`` (once; an existing record is kept)."""
        if not self.model_marker.is_file():
            self.create()
            self.model_marker.write_text(json.dumps({"model": self.model_identity(model)}))

    def create(self) -> DataDir:
        """Create the data dir (``0700``) if it does not exist; returns ``self``."""
        make_private_dir(self.root)
        return self

    def require(self) -> DataDir:
        """Return ``self`` if it is an app's data dir (it holds the database).

        Raises:
            DataDirError: the directory or its database does not exist.
        """
        if not self.root.is_dir():
            raise DataDirError(f"--data-dir {self.root} does not exist; pass the app's data dir")
        if not self.db.is_file():
            raise DataDirError(f"no database at {self.db}; pass --data-dir pointing at the app's data dir")
        return self
