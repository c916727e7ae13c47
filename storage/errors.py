"""Exceptions raised by the storage layer.

Lookup failures subclass ``KeyError`` and state-conflicts subclass ``ValueError`` so callers
can catch the built-in type; every message says what happened and what to do.
"""

from __future__ import annotations


class _PlainKeyError(KeyError):
    """A ``KeyError`` whose ``str()`` is the message itself, not its ``repr``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownConversation(_PlainKeyError):
    """No conversation with this id exists."""


class UnknownComparison(_PlainKeyError):
    """No comparison with this id exists."""


class UnknownRound(_PlainKeyError):
    """No training round with this id exists."""


class UnknownVersion(_PlainKeyError):
    """No policy version with this number is registered."""


class RejectedVersion(_PlainKeyError, ValueError):
    """The version exists but was rejected, so it cannot be served."""


class AlreadyVoted(ValueError):
    """The comparison already has a vote; the first vote is kept."""


class RoundAlreadyRunning(RuntimeError):
    """A training round is still marked 'running'."""


class RoundOwnedElsewhere(RoundAlreadyRunning):
    """The round is being run by another live process (it holds the data dir's round lock):
    only that process may finish it."""
