"""CLI flags generated from config dataclasses (training.cli)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from training.cli import add_dataclass_args, dataclass_from_args, help_field


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


def test_app_round_args_are_checked_at_startup_and_reach_the_round(tmp_path, monkeypatch):
    from app import AppConfig
    from training.jobs import parse_round_flags

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my demos.jsonl").write_text("")
    config = AppConfig(round_args="--rs.n 8 --ppo.ptx-coef 0.1 --ptx-data 'my demos.jsonl'")
    flags = config.round_flags
    assert flags[-2:] == ["--ptx-data", str(tmp_path / "my demos.jsonl")]  # the round runs elsewhere
    round_config = parse_round_flags(flags)
    assert round_config.rs.n == 8 and round_config.ppo.ptx_coef == 0.1
    assert round_config.ptx_data == str(tmp_path / "my demos.jsonl")
    for bad, message in (("--ppo.lr fast", "--ppo.lr"), ("--no-such-flag 1", "--no-such-flag"),
                         ("--rs.n 0", "RejectionConfig.n"), ("--min-votes 3", "app sets this"),
                         ("--model=x", "app sets this"), ("--rs.n '8", "quotation"),
                         ("--data /elsewhere", "unknown training flag"),  # no abbreviations of app flags
                         ("--reward.min-votes 3", "app sets this"), ("--help", "training.jobs --help"),
                         ("--rs.lr inf", "--rs.lr"), ("--ptx-data missing.jsonl", "no such file")):
        with pytest.raises(ValueError, match=message) as caught:
            AppConfig(round_args=bad)
        assert str(caught.value).startswith("--round-args")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert AppConfig(round_args="--ptx-data ~/'my demos.jsonl'").round_flags[-1] == str(tmp_path / "my demos.jsonl")


def test_benchmark_checks_round_args_before_starting():
    from bench.online_loop import BenchConfig

    assert BenchConfig(round_args="--rs.n 8").round_args == "--rs.n 8"
    with pytest.raises(ValueError, match="--rs.n"):
        BenchConfig(round_args="--rs.n eight")
