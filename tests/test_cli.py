"""CLI flags generated from config dataclasses (training.flags)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

import pytest

from training.flags import add_dataclass_args, dataclass_from_args, help_field, to_argv
from training.rejection_sampling import RejectionConfig
from training.round import RoundConfig


@dataclass
class Inner:
    lr: float = help_field(0.1, help="learning rate")
    adaptive: bool = help_field(True, help="adapt")


@dataclass
class Outer:
    name: str = help_field("x", help="a name")
    steps: int = help_field(3, help="how many")
    off: bool = help_field(False, help="switch")
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Outer)
    return dataclass_from_args(Outer, parser.parse_args(argv))


def test_defaults_round_trip():
    assert _parse([]) == Outer()


def test_flags_types_nested_and_bools():
    cfg = _parse(["--name", "y", "--steps", "7", "--off", "--inner.lr", "0.5", "--inner.adaptive", "false"])
    assert cfg == Outer(name="y", steps=7, off=True, inner=Inner(lr=0.5, adaptive=False))
    assert _parse(["--off", "no"]).off is False


def test_validation_and_bad_values():
    with pytest.raises(ValueError, match="steps"):
        _parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        _parse(["--inner.adaptive", "maybe"])
    with pytest.raises(SystemExit):
        _parse(["--steps", "three"])


def test_to_argv_rebuilds_the_config():
    cfg = Outer(name="-dash", steps=7, off=True, inner=Inner(lr=0.5, adaptive=False))
    argv = to_argv(cfg)
    assert argv == ["--name=-dash", "--steps=7", "--off=true", "--inner.lr=0.5", "--inner.adaptive=false"]
    assert _parse(argv) == cfg
    assert to_argv(Outer()) == []  # defaults are left to the child's own


def test_app_round_settings_are_a_nested_config_and_reach_the_round(tmp_path, monkeypatch):
    from app import AppConfig
    from training.jobs import build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my demos.jsonl").write_text("")
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, AppConfig)
    config = dataclass_from_args(AppConfig, parser.parse_args(
        ["--round.rs.n", "8", "--round.ppo.ptx-coef", "0.1", "--round.ptx-data", "my demos.jsonl",
         "--round.gate.enabled", "false", "--round.seed", "3", "--concurrency", "3"]))
    assert config.round.ptx_data == str(tmp_path / "my demos.jsonl")  # absolute: the round runs elsewhere
    argv = config.round_argv("/data", "/models/base")
    child = dataclass_from_args(RoundConfig, build_parser().parse_args(argv))
    assert child == replace(config.round, data_dir="/data", model="/models/base", user_gate=True)
    assert (child.rs.n, child.ppo.ptx_coef, child.gate.enabled, child.seed) == (8, 0.1, False, 3)
    # the app's --user-gate decides whether its rounds publish a passing candidate for users' votes
    off = dataclass_from_args(AppConfig, parser.parse_args(["--user-gate", "false"]))
    assert dataclass_from_args(RoundConfig, build_parser().parse_args(off.round_argv("/d", "/m"))).user_gate is False
    for flag in ("--round.data-dir", "--round.model", "--round.reward.min-votes", "--round.ppo.seed", "--round.user-gate"):
        with pytest.raises(SystemExit):  # the app sets these itself
            parser.parse_args([flag, "1"])
    for bad, message in ((["--round.rs.n", "0"], "RejectionConfig.n"), (["--round.ptx-data", "missing.jsonl"], "no such file"),
                         (["--round.rs.lr", "inf"], "--rs.lr")):
        with pytest.raises(ValueError, match=message):
            dataclass_from_args(AppConfig, parser.parse_args(bad))


def test_app_points_round_flags_to_round(capsys):
    from app import main

    with pytest.raises(SystemExit):
        main(["--ppo.lr", "1e-3"])
    assert "--round.ppo.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--round.ppo.lr", "fast"])
    assert "--round.ppo.lr" in capsys.readouterr().err


def test_benchmarks_take_the_round_settings_nested():
    from bench.online_loop import BenchConfig
    from bench.ppo_replay import ReplayConfig

    assert BenchConfig(round=RoundConfig(rs=RejectionConfig(n=8))).round.rs.n == 8
    replay = ReplayConfig(data_dir="run", seed=4)
    assert (replay.round.init_policy, replay.round.seed, replay.round.data_dir) == ("reference", 4, "run")
    assert ReplayConfig(data_dir="run", init_policy="live").round.init_policy == "live"
