"""Votes stay private: an export is a one-time link only the admin's authenticated call hands
out (file 0600 in a 0700 directory, gone after the download, on expiry and at exit, never in
Gradio's public cache); the data dir is created 0700 and ``chat.db`` 0600; uploads are capped;
failed admin logins are rate-limited and log one line each, never a traceback."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import httpx
import pytest

from app import AppConfig, build_app
from chatapp.auth import AdminAuth, AdminRequired
from chatapp.exports import ROUTE_PREFIX, ExportDesk
from storage.paths import DataDir
from storage.store import open_store
from tests.conftest import add_votes, free_port, served_app


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the export desk --------------------------------------------------------------------------
def test_an_export_is_a_private_file_behind_a_one_time_link(store):
    add_votes(store, 3)
    desk = ExportDesk(store)
    link, n = desk.create()
    assert n == 3 and link.startswith(ROUTE_PREFIX)
    token = link.removeprefix(ROUTE_PREFIX)
    (path,) = desk.dir.iterdir()
    assert _mode(desk.dir) == 0o700 and _mode(path) == 0o600
    assert len(path.read_text().splitlines()) == 3

    assert desk.take("not-" + token) is None  # a guessed token gets nothing
    assert desk.take(token) == path
    assert desk.take(token) is None  # once only
    desk.close()
    assert not desk.dir.exists()


def test_an_unfetched_export_expires_and_is_deleted(store, monkeypatch):
    add_votes(store, 1)
    desk = ExportDesk(store, ttl_s=60)
    clock = [1000.0]
    monkeypatch.setattr("chatapp.exports.time.monotonic", lambda: clock[0])
    link, _ = desk.create()
    (path,) = desk.dir.iterdir()
    clock[0] += 59
    desk.create()  # another export within the minute keeps the first
    assert path.exists()
    clock[0] += 2  # past the first one's expiry
    assert desk.take(link.removeprefix(ROUTE_PREFIX)) is None
    assert not path.exists()
    with pytest.raises(ValueError, match="ttl_s"):
        ExportDesk(store, ttl_s=0)
    desk.close()


# ---- over HTTP ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_export_link_works_once_and_uploads_are_capped(tiny_model_dir, tmp_path, monkeypatch, capfd):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
                       no_train=True, max_new_tokens=2, auth="admin:s3cret")
    add_votes(open_store(DataDir(config.data_dir).create()), 4)
    with served_app(config) as (demo, _):
        url = f"http://127.0.0.1:{config.port}"
        client = Client(url + "/", verbose=False)
        with pytest.raises(AppError, match="needs an admin login"):
            client.predict("admin", "wrong", api_name="/export_votes")
        assert "Traceback" not in capfd.readouterr().err  # an expected refusal: one log line
        answer = client.predict("admin", "s3cret", api_name="/export_votes")
        assert "4 preference pairs" in answer
        (link,) = [part.split(")")[0] for part in answer.split("](")[1:]]
        assert httpx.get(url + ROUTE_PREFIX + "x" * 32).status_code == 404  # no link, no votes
        first = httpx.get(url + link)
        assert first.status_code == 200 and len(first.text.splitlines()) == 4
        again = httpx.get(url + link)
        assert again.status_code == 404 and "already used" in again.text
        assert not any(tmp_path.rglob("*.jsonl"))  # no copy, in Gradio's public cache or elsewhere

        big = httpx.post(url + "/gradio_api/upload", files={"files": ("big.txt", b"x" * 200_000)})
        assert big.status_code == 413


# ---- files on disk ---------------------------------------------------------------------------------
def test_the_data_dir_and_database_are_created_private(tmp_path):
    data = DataDir(tmp_path / "fresh" / "data")
    store = open_store(data)
    store.new_conversation("s")
    store.close()
    assert _mode(data.root) == 0o700
    assert _mode(data.db) == 0o600
    assert _mode(DataDir(tmp_path / "other").create().root) == 0o700


@pytest.mark.slow
def test_the_app_creates_its_data_dir_private(tiny_model_dir, tmp_path):
    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), no_train=True)
    demo, _ = build_app(config)
    demo.rlhf_store.close()
    data = DataDir(config.data_dir)
    assert _mode(data.root) == 0o700 and _mode(data.db) == 0o600
    assert all(_mode(p) & 0o077 == 0 for p in data.root.glob("chat.db*"))


# ---- admin logins ----------------------------------------------------------------------------------
def test_failed_admin_logins_are_rate_limited_per_client_and_user(caplog):
    auth = AdminAuth({"admin": "s3cret"}, failed_login_rate="3/minute")
    with caplog.at_level(logging.WARNING, logger="chatapp.auth"):
        for guess in ("a", "b", "c"):
            with pytest.raises(AdminRequired, match="needs an admin login"):
                auth.require("admin", guess, "Rollback", client="10.0.0.9")
        # the right password is refused too now: guessing at speed gets nowhere
        with pytest.raises(AdminRequired, match="Too many failed admin logins"):
            auth.require("admin", "s3cret", "Rollback", client="10.0.0.9")
        with pytest.raises(AdminRequired, match="Too many"):  # the user is locked from elsewhere too
            auth.require("admin", "s3cret", "Rollback", client="10.0.0.10")
    assert len(caplog.records) == 5 and all(r.exc_info is None for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records)

    # another user from another client is not affected; not logging in at all is not a guess
    other = AdminAuth({"admin": "s3cret", "bob": "pw"}, failed_login_rate="3/minute")
    for _ in range(5):
        with pytest.raises(AdminRequired, match="needs an admin login"):
            other.require(None, None, "Train now", client="10.0.0.9")
    for guess in ("a", "b", "c"):
        with pytest.raises(AdminRequired):
            other.require("admin", guess, "Train now", client="10.0.0.9")
    other.require("bob", "pw", "Train now", client="10.0.0.11")  # passes
    with pytest.raises(AdminRequired, match="Too many"):
        other.require("bob", "pw", "Train now", client="10.0.0.9")  # this client guessed too often
