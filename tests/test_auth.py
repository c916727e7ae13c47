"""Exposure: the app binds 127.0.0.1 unless ``--host`` says otherwise; ``--auth USER:PASS`` /
``--auth-file`` put the admin actions (Train now, rollback, export) behind a login checked in
each handler, over HTTP too, while chat stays open; only safetensors weights are loaded."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from app import AppConfig, main
from chatapp.auth import AdminAuth, parse_credential
from tests.conftest import fetch_export, free_port, served_app
from training.models import ModelLoadError, load_model_and_tokenizer


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (read from /proc, no traffic)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(addr if width == 32 else socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


# ---- credentials --------------------------------------------------------------------------
def test_credentials_parse_and_check(tmp_path):
    assert parse_credential("admin:pa:ss") == ("admin", "pa:ss")
    for bad in ("admin", ":pw", "admin:"):
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_credential(bad)
    f = tmp_path / "admins.txt"
    f.write_text("# admins\nalice:one\n\nbob:two\n")
    auth = AdminAuth.from_options("root:zero", str(f))
    assert auth.check("alice", "one") and auth.check("bob", "two") and auth.check("root", "zero")
    assert not auth.check("alice", "two") and not auth.check("mallory", "one")
    assert not auth.check("", "") and not auth.check(None, None)
    f.write_text("alice:one\nbroken line\n")
    with pytest.raises(ValueError, match="admins.txt:2"):
        AdminAuth.from_options("", str(f))
    assert AdminAuth.from_options("", "") is None


def test_bad_auth_flags_fail_early_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--auth", "no-colon", "--data-dir", str(tmp_path)])
    assert e.value.code == 2 and "USER:PASS" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--auth-file", str(tmp_path / "missing.txt"), "--data-dir", str(tmp_path)])
    assert e.value.code == 2 and "missing.txt" in capsys.readouterr().err


# ---- over HTTP ----------------------------------------------------------------------------
@pytest.fixture
def app_with_auth(tiny_model_dir, tmp_path):
    config = AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
        max_new_tokens=2, auth="admin:s3cret",
    )  # fmt: skip
    with served_app(config):
        yield config


@pytest.mark.slow
def test_admin_actions_refuse_without_login_chat_stays_open(app_with_auth):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    config = app_with_auth
    assert config.host == "127.0.0.1" == AppConfig().host
    assert _listening_addresses(config.port) == {"127.0.0.1"}  # not reachable from the network
    client = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
    chat, *_ = client.predict("hello", False, api_name="/send")  # chat needs no login
    assert chat[-1]["role"] == "assistant"
    status, *_ = client.predict(api_name="/training_status")  # reading status is open
    assert "Live policy version" in status

    refused = [
        ("/train_now", ()), ("/export_votes", ()), ("/rollback", ("0",)),
        ("/train_now", ("admin", "wrong")), ("/export_votes", ("admin", "")),
        ("/rollback", ("0", "someone", "s3cret")),
    ]  # fmt: skip
    for api_name, args in refused:
        with pytest.raises(AppError, match="needs an admin login"):
            client.predict(*args, api_name=api_name)
    rounds = open_rounds(config)
    assert rounds == []  # no round was started by the refused Train now

    exported = client.predict("admin", "s3cret", api_name="/export_votes")
    assert fetch_export(f"http://127.0.0.1:{config.port}/", exported) == ""  # allowed: no votes yet
    status = client.predict("0", "admin", "s3cret", api_name="/rollback")
    assert "Live policy version:** 0" in status


def open_rounds(config) -> list:
    from storage.store import open_store

    return open_store(config.data_dir).rounds()


@pytest.mark.slow
def test_host_flag_opens_the_app(tiny_model_dir, tmp_path):
    config = AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
        host="0.0.0.0", no_train=True, max_new_tokens=2,
    )  # fmt: skip
    with served_app(config):
        assert _listening_addresses(config.port) & {"0.0.0.0", "00000000000000000000000000000000"}


# ---- safetensors only -----------------------------------------------------------------------
def test_a_model_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    state = {}
    for f in pickled.glob("*.safetensors"):
        from safetensors.torch import load_file

        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model_and_tokenizer(pickled)
    code = main(["--model", str(pickled), "--data-dir", str(tmp_path / "data"), "--no-train", "true"])
    assert code == 2 and "safetensors" in capsys.readouterr().err
    assert loads == [], "a pickle file was unpickled"


def test_an_adapter_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from training.models import add_lora, load_lora

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    adapter = tmp_path / "adapter"
    add_lora(model).save_pretrained(str(adapter))
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")
    weights.unlink()
    fresh, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises((ValueError, FileNotFoundError, ModelLoadError), match="safetensors"):
        load_lora(fresh, adapter, "pickled")
