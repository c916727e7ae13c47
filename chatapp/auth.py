"""Admin login for the actions that change or leak the app's state (Train now, rollback,
export of every vote), while chat stays open to everyone.

Gradio's ``launch(auth=...)`` puts a login in front of the whole app, chat included, so the
check is per action instead: each admin handler receives the user and password typed into the
Training tab (or sent over the HTTP API) and calls :meth:`AdminAuth.require`. Passwords are
compared in constant time.

    python app.py --auth admin:s3cret            # one admin
    python app.py --auth-file admins.txt         # USER:PASS lines; '#' starts a comment
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path

from limits import parse, storage, strategies

log = logging.getLogger(__name__)
FAILED_LOGIN_RATE = "5/minute"  # failed admin logins allowed per client address (and per user name)


class AdminRequired(PermissionError):
    """An admin action was called without valid admin credentials."""


def parse_credential(text: str, where: str = "--auth") -> tuple[str, str]:
    """``"USER:PASS"`` → ``(user, password)``; the password may itself contain colons.

    Raises:
        ValueError: no colon, or an empty user or password.
    """
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: expected USER:PASS with a non-empty user and password")
    return user, password


@dataclass(frozen=True)
class AdminAuth:
    """The admins allowed to run admin actions: ``{user: password}``."""

    users: dict[str, str]
    failed_login_rate: str = FAILED_LOGIN_RATE
    _failures: strategies.MovingWindowRateLimiter = field(
        default_factory=lambda: strategies.MovingWindowRateLimiter(storage.MemoryStorage()), repr=False, compare=False)

    def __post_init__(self):
        if not self.users:
            raise ValueError("AdminAuth needs at least one USER:PASS")

    @classmethod
    def from_options(cls, auth: str = "", auth_file: str = "") -> AdminAuth | None:
        """From ``--auth USER:PASS`` and/or ``--auth-file FILE``; None when neither is given.

        Raises:
            ValueError: a malformed credential (the message names the file and line).
            OSError: the file cannot be read.
        """
        users: dict[str, str] = {}
        if auth:
            user, password = parse_credential(auth)
            users[user] = password
        if auth_file:
            path = Path(auth_file)
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, password = parse_credential(line, f"{path}:{n}")
                users[user] = password
            if not users:
                raise ValueError(f"{path} holds no USER:PASS line")
        return cls(users) if users else None

    def check(self, user: str | None, password: str | None) -> bool:
        """True if ``user``/``password`` is one of the admins (constant-time comparison)."""
        expected = self.users.get(user or "")
        given = (password or "").encode()
        # compare against something even for an unknown user, so timing does not tell
        ok = hmac.compare_digest(given, (expected if expected is not None else "\0").encode())
        return ok and expected is not None

    def require(self, user: str | None, password: str | None, action: str, client: str | None = None) -> None:
        """Raise :class:`AdminRequired` unless ``user``/``password`` is an admin.

        Failed attempts are counted per client address and per user name; past
        ``failed_login_rate`` (moving window) further attempts are refused without checking the
        password, so it cannot be guessed at speed. Each failure logs one line.
        """
        rate = parse(self.failed_login_rate)
        keys = [("user", user or ""), *([("client", client)] if client else [])]
        if not user and not password:  # no login typed: nothing guessed, nothing counted
            raise AdminRequired(self._needs_login(action))
        if not all(self._failures.test(rate, kind, key) for kind, key in keys):
            log.warning("admin login for %s refused: too many failed attempts (user %r, client %s)", action, user, client)
            raise AdminRequired(f"Too many failed admin logins (at most {self.failed_login_rate}): wait a minute.")
        if not self.check(user, password):
            for kind, key in keys:
                self._failures.hit(rate, kind, key)
            log.warning("admin login for %s failed (user %r, client %s)", action, user, client)
            raise AdminRequired(self._needs_login(action))

    @staticmethod
    def _needs_login(action: str) -> str:
        return (f"{action} needs an admin login: enter the admin user and password (set with "
                "--auth or --auth-file) in the Training tab.")
