"""A short end-to-end loop on a device: the app serving, votes over its HTTP API, one training
round in its child process, the new version hot-swapped into the next reply.

    python -m bench.e2e_loop [--arch smollm2-135m] [--device cuda] [--quantize 4bit] [--json OUT]

The model is ``bench.models``' random-weight build of ``--arch`` (``tiny``: the 2-layer test
model); the round is short (``--ppo-steps`` iterations of 16 answers, gate off) so the loop ends
in minutes. Prints each stage with its seconds and one JSON object; exit code 1 when a stage
did not do what it should (a round that did not succeed, a reply not from the new version).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.flags import add_dataclass_args, dataclass_from_args, help_field


@dataclass
class LoopConfig:
    """Flags of ``python -m bench.e2e_loop``."""

    arch: str = help_field("smollm2-135m", help="a bench.models architecture, or tiny")
    device: str = help_field("auto", help="--device of the app and its round")
    dtype: str = help_field("auto", help="--dtype of the app and its round")
    quantize: str = help_field("none", help="--quantize of the app and its round")
    votes: int = help_field(12, help="comparisons voted before the round")
    ppo_steps: int = help_field(2, help="PPO iterations of the round (16 answers each)")
    port: int = help_field(7871, help="port of the app under test")
    json: str = help_field("", help="also write the JSON result to this file")


def run(config: LoopConfig) -> dict:
    from gradio_client import Client

    from app import AppConfig, build_app, launch
    from bench.models import build
    from storage.store import open_store
    from training.gate import GateConfig
    from training.models import LoadConfig
    from training.ppo import PPOConfig
    from training.rejection_sampling import RejectionConfig
    from training.round import RoundConfig
    from training.starter.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - t0, 2)
        print(f"[{timings[stage]:7.1f}s] {stage}", flush=True)

    model_dir = build_tiny_model(work / "model") if config.arch == "tiny" else build(config.arch, work / "model")
    mark("model built")
    app_config = AppConfig(
        model=str(model_dir), data_dir=str(work / "data"), port=config.port, max_new_tokens=16,
        load=LoadConfig(device=config.device, dtype=config.dtype, quantize=config.quantize),
        round=RoundConfig(min_votes=max(2, config.votes // 2), gate=GateConfig(enabled=False), rs=RejectionConfig(n=1),
                          ppo=PPOConfig(steps=config.ppo_steps, rollout_batch_size=16, mini_batch_size=8,
                                        max_new_tokens=16, normalize_samples=8)),
    )
    result: dict = {"settings": asdict(config)}
    demo, scheduler = build_app(app_config)
    try:
        launch(demo, app_config, block=False)
        mark("app up")
        client = Client(f"http://127.0.0.1:{app_config.port}/", verbose=False)
        store = open_store(app_config.data_dir)
        for i in range(config.votes):
            client.predict(f"question number {i}", True, api_name="/send")
            client.predict(api_name="/vote_a" if i % 2 else "/vote_b")
        mark(f"{config.votes} comparisons voted")
        round_row = scheduler.run_now("manual")
        mark(f"round {round_row['status']}")
        client.predict("hello after the round", False, api_name="/send")
        served = store.db.execute(
            "select policy_version from messages where role = 'assistant' order by id desc limit 1").fetchone()[0]
        mark(f"next reply from version {served}")
        result.update({"round_status": round_row["status"], "version": round_row["version"], "served_version": served,
                       "round_reason": round_row["reason"], "timings_s": timings,
                       "ppo_s": (round_row.get("metrics") or {}).get("time/ppo_s")})
    finally:
        demo.close()
        scheduler.shutdown()
    result["ok"] = result["round_status"] == "succeeded" and result["served_version"] == result["version"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_loop", description=__doc__.split("\n")[0])
    add_dataclass_args(parser, LoopConfig)
    try:
        config = dataclass_from_args(LoopConfig, parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    result = run(config)
    print(json.dumps(result))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
