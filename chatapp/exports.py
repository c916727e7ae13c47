"""Vote exports only the admin who asked can fetch.

Gradio's file outputs are copied to a world-readable cache and served to anyone who has the URL,
for as long as the server runs. The export of every vote is instead written to a private
directory (``0700``, the file ``0600``) and served by one extra HTTP route of the app,
``GET /rlhf/export/{token}``: the token is random (``secrets``, 192 bits), appears only in the
answer to the admin's authenticated "Export votes" call, works once (the file is deleted once it
was sent) and expires after ``ttl_s``; whatever is left is deleted when the app exits.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

ROUTE_PREFIX = "/rlhf/export/"


class ExportDesk:
    """One-time download links for :meth:`storage.store.Store.export_jsonl`.

    Args:
        store: the store whose votes are exported.
        ttl_s: seconds a link stays valid, in seconds (> 0).
    """

    def __init__(self, store, ttl_s: float = 600.0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.ttl_s = ttl_s
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-exports-"))  # mode 0700: this user only
        self._links: dict[str, tuple[Path, float]] = {}  # token -> (file, expiry on time.monotonic())
        self._lock = threading.Lock()
        atexit.register(self.close)

    def create(self) -> tuple[str, int]:
        """Export the votes now; returns ``(url path of the one-time link, number of pairs)``."""
        token = secrets.token_urlsafe(24)
        path = self.dir / f"{token}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            n = self.store.export_jsonl(f)
        with self._lock:
            self._expire()
            self._links[token] = (path, time.monotonic() + self.ttl_s)
        return ROUTE_PREFIX + token, n

    def take(self, token: str) -> Path | None:
        """The export file of ``token``, which stops being valid now; None for an unknown,
        used or expired token."""
        with self._lock:
            self._expire()
            path, _ = self._links.pop(token, (None, 0.0))
        return path

    def _expire(self) -> None:
        """Forget and delete links past their expiry (under the lock)."""
        now = time.monotonic()
        for token in [t for t, (_, until) in self._links.items() if until < now]:
            self._links.pop(token)[0].unlink(missing_ok=True)

    def download(self, token: str):
        """The HTTP endpoint: the file once, then it is deleted; 404 otherwise."""
        path = self.take(token)
        if path is None or not path.is_file():
            return PlainTextResponse("This export link was already used or has expired: export the votes again.",
                                     status_code=404)
        return FileResponse(path, filename="votes.jsonl", media_type="application/jsonl",
                            background=BackgroundTask(path.unlink, missing_ok=True))

    def route(self) -> APIRoute:
        """``GET /rlhf/export/{token}``, for the app's FastAPI routes (``app.launch``)."""
        return APIRoute(ROUTE_PREFIX + "{token}", self.download, methods=["GET"], include_in_schema=False)

    def close(self) -> None:
        """Delete every export not fetched yet (called at exit)."""
        with self._lock:
            self._links.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
