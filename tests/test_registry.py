"""The registry of policy versions: the rows in SQLite (live, rollback, rejected) and the
adapter folders on disk (atomic publish, numbering, crash leftovers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from storage.errors import RejectedVersion, UnknownRound, UnknownVersion
from storage.paths import DataDir, DataDirError
from storage.registry import (
    AdapterRegistry,
    CorruptAdapter,
    RewardModelRegistry,
    clean_staging,
    is_complete,
)
from storage.store import open_store


def write_adapter(directory: Path, marker: str = "w") -> Path:
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(marker.encode() * 64)
    return directory


def test_version_registry_live_rollback_and_errors(store):
    assert store.next_version() == 0 and store.live_version() is None
    rid = store.start_round("manual")
    store.register_version(0, "/v0", None, None, None, status="live")
    store.register_version(1, "/v1", 0, rid, {"rm/accuracy": 0.8})
    assert store.live_version() == 0 and store.next_version() == 2
    assert store.set_live(1)["status"] == "live"
    assert [(v["version"], v["status"]) for v in store.versions()] == [(0, "retired"), (1, "live")]
    assert store.version(1)["metrics"] == {"rm/accuracy": 0.8} and store.version(1)["parent"] == 0
    store.set_live(0)  # rollback
    assert store.live_version() == 0 and store.version(1)["status"] == "retired"
    store.set_version_status(1, "rejected")
    with pytest.raises(RejectedVersion, match="rejected"):
        store.set_live(1)
    with pytest.raises(ValueError, match="set_live"):
        store.set_version_status(0, "retired")
    with pytest.raises(UnknownVersion):
        store.set_live(7)
    with pytest.raises(ValueError, match="already registered"):
        store.register_version(1, "/again", 0, None, None)
    with pytest.raises(UnknownRound):
        store.register_version(2, "/v2", 1, 999, None)
    assert store.live_version() == 0


def test_registry_publish_numbering_and_rollback(store, tmp_path):
    data = DataDir(tmp_path / "data")
    root = data.adapters
    reg = AdapterRegistry(data, store)
    staging = write_adapter(reg.staging_dir())
    assert staging.parent == root / ".staging"
    assert not list(root.glob("v*"))  # a staging dir is never visible as a version
    v0 = reg.publish(staging, parent=None, round_id=None, metrics=None)
    assert v0 == 0 and not staging.exists() and is_complete(root / "v0")
    r = store.start_round("manual")
    v1 = reg.publish(write_adapter(reg.staging_dir(), "1"), parent=0, round_id=r,
                     metrics={"objective/reward": 1.5})
    v2 = reg.publish(write_adapter(reg.staging_dir(), "2"), parent=1, round_id=None,
                     metrics=None, live=False)
    assert (v1, v2) == (1, 2)
    assert store.live_version() == 1 and store.version(2)["status"] == "candidate"
    assert reg.path(1) == root / "v1"
    assert (reg.path(1) / "adapter_model.safetensors").read_bytes() == b"1" * 64
    store.set_live(0)
    assert reg.path(store.live_version()) == root / "v0"
    assert sorted(p.name for p in root.iterdir()) == [".staging", "v0", "v1", "v2"]
    assert store.version(2)["path"] == "adapters/v2"  # relative to the data dir
    assert list((root / ".staging").iterdir()) == []


def test_a_copied_data_dir_serves_its_own_adapters(tmp_path):
    original = DataDir(tmp_path / "data")
    store = open_store(original)
    reg = AdapterRegistry(original, store)
    reg.publish(write_adapter(reg.staging_dir(), "o"))
    store.close()
    copy = DataDir(tmp_path / "copy")
    shutil.copytree(original.root, copy.root)
    write_adapter(copy.adapters / "v0", "c")  # the copy's own adapter differs
    with open_store(copy) as copied:
        with pytest.raises(CorruptAdapter):  # its bytes differ from what was published
            AdapterRegistry(copy, copied).path(0)
        path = AdapterRegistry(copy, copied).path(0, verify=False)
    assert path == copy.adapters / "v0"
    assert (path / "adapter_model.safetensors").read_bytes() == b"c" * 64
    # rows written with absolute paths (older versions) resolve under the copy too
    with open_store(copy) as copied:
        copied.db.execute("UPDATE policy_versions SET path = ?", [str(original.adapters / "v0")])
        assert AdapterRegistry(copy, copied).path(0, verify=False) == copy.adapters / "v0"
        shutil.rmtree(copy.adapters / "v0")
        with pytest.raises(FileNotFoundError, match="restore"):
            AdapterRegistry(copy, copied).path(0)  # never the original's directory


def test_registry_refuses_incomplete_and_foreign_dirs(store, tmp_path):
    reg = AdapterRegistry(DataDir(tmp_path), store)
    half = reg.staging_dir()
    (half / "adapter_config.json").write_text("{}")  # weights not written yet
    with pytest.raises(ValueError, match="not complete"):
        reg.publish(half, None, None, None)
    outside = write_adapter(tmp_path)
    with pytest.raises(ValueError, match="staging_dir"):
        reg.publish(outside, None, None, None)
    with pytest.raises(ValueError, match="staging_dir"):
        reg.discard(outside)
    assert store.versions() == [] and (tmp_path / "adapter_config.json").exists()


def test_registry_crash_leftovers(store, tmp_path):
    data = DataDir(tmp_path)
    root = data.adapters
    reg = AdapterRegistry(data, store)
    (root / "v0").mkdir()
    write_adapter(root / "v0")  # a crash after the rename, before registering
    assert reg.publish(write_adapter(reg.staging_dir()), None, None, None) == 1
    assert [v["version"] for v in store.versions()] == [1]
    # registering fails (unknown round): the directory goes back to staging
    staging = write_adapter(reg.staging_dir())
    with pytest.raises(UnknownRound):
        reg.publish(staging, 1, 999, None)
    assert is_complete(staging) and not (root / "v2").exists()
    reg.discard(staging)
    assert not staging.exists()
    reg.staging_dir()
    write_adapter(reg.staging_dir())
    rm_staging = write_adapter(RewardModelRegistry(data).staging_dir())
    assert clean_staging(data) == 3 and list((root / ".staging").iterdir()) == []
    assert not rm_staging.exists()


def test_reward_models_are_published_like_adapters(tmp_path):
    data = DataDir(tmp_path)
    rms = RewardModelRegistry(data, keep=2)
    assert rms.latest() is None
    (data.reward_models / "latest").mkdir()
    legacy = write_adapter(data.reward_models / "latest")  # where older data dirs kept theirs
    assert rms.latest() == legacy
    shutil.rmtree(legacy)
    half = rms.staging_dir()
    (half / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="not complete"):
        rms.publish(half)
    assert rms.latest() is None and not list(data.reward_models.glob("r*"))
    rms.discard(half)
    first = rms.publish(write_adapter(rms.staging_dir(), "1"))
    assert first == data.reward_models / "r1" and rms.latest() == first
    second = rms.publish(write_adapter(rms.staging_dir(), "2"))
    third = rms.publish(write_adapter(rms.staging_dir(), "3"))
    assert rms.latest() == third == data.reward_models / "r3"
    assert (third / "adapter_model.safetensors").read_bytes() == b"3" * 64
    assert sorted(p.name for p in data.reward_models.glob("r*")) == ["r2", "r3"]  # older ones pruned
    assert second.is_dir() and not first.exists()


def test_a_symlinked_adapters_dir_publishes_and_stays_relative(store, tmp_path):
    data = DataDir(tmp_path / "data")
    elsewhere = tmp_path / "bigger-disk" / "adapters"
    elsewhere.mkdir(parents=True)
    data.adapters.symlink_to(elsewhere)
    reg = AdapterRegistry(data, store)
    assert reg.publish(write_adapter(reg.staging_dir())) == 0
    assert store.version(0)["path"] == "adapters/v0" and (elsewhere / "v0" / "adapter_config.json").is_file()
    assert reg.path(0) == data.adapters / "v0"
    with pytest.raises(ValueError, match="keep"):
        RewardModelRegistry(data, keep=0)


def test_the_data_dirs_base_model_check(tmp_path):
    data = DataDir(tmp_path / "data")
    (data.starter).mkdir(parents=True)
    data.record_model("")  # no --model: the starter
    assert data.recorded_model() == "starter"
    for same in ("", str(data.starter), str(tmp_path / "data" / "." / "starter")):
        data.check_model(same)
    other = tmp_path / "other-model"
    other.mkdir()
    with pytest.raises(DataDirError, match="starter"):
        data.check_model(str(other))
    with pytest.raises(DataDirError):
        data.check_model("org/hub-model")
    # a data dir whose marker names its starter by path (an explicit --model DATA/starter) still fits
    data.model_marker.write_text(json.dumps({"model": str(data.starter)}))
    data.check_model("")
    data.model_marker.write_text("{not json")
    with pytest.raises(DataDirError, match="not valid JSON"):
        data.check_model("")
