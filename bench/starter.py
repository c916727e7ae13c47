"""Benchmark the starter model: build from nothing, evaluate, time a 30-token reply.

Run: ``python -m bench.starter --json bench_starter.json [--seed 0] [--out DIR]``

Prints one JSON object of figures (and writes it to ``--json``): ``build_seconds`` (wall) and
``build_cpu_seconds`` (CPU time of the build; with T threads, wall ≫ cpu / T says the cores
were shared), the eval
figures of :mod:`training.starter.eval` (``per_skill``, ``mean``, ``min``, ``heldout_phrasing``,
``unseen_name_recall`` and ``system_prompt_heldout`` with their standard errors,
``distinct_style_rate``), ``reply_30_tokens_s`` (median wall time of a greedy 30-token reply,
no early stop, through the same loading path as the app) and the targets of issue 3 with a
met/not-met flag each. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {  # issue 3, on 2 CPU cores; recall of unseen names and system prompts: issue 22
    "build_seconds": ("<=", 300.0),
    "unseen_name_recall": (">=", 0.90),
    "system_prompt_heldout": (">=", 0.90),
    "mean": (">=", 0.95),
    "min": (">=", 0.85),
    "heldout_phrasing": (">=", 0.70),
    "distinct_style_rate": (">=", 0.80),
    "reply_30_tokens_s": ("<=", 1.0),
}


def time_reply(model_dir: Path, tokens: int = 30, repeats: int = 5) -> float:
    """Median seconds for one greedy reply of exactly ``tokens`` new tokens (end-of-turn ignored)."""
    from training.chat_format import render_prompt
    from training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    prompt = torch.tensor([render_prompt(tok, [{"role": "user", "content": "What is 12 plus 30?"}])],
                          device=next(model.parameters()).device)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def main(argv: list[str] | None = None) -> dict:
    from training.models import load_model_and_tokenizer
    from training.starter.build import StarterConfig, build_starter
    from training.starter.eval import evaluate

    parser = argparse.ArgumentParser(prog="python -m bench.starter", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--seed", type=int, default=0, help="starter seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="build here (default: a temporary directory)")
    parser.add_argument("--model", type=Path, default=None,
                        help="skip the build: evaluate this existing starter build and report the "
                             "build times recorded in its starter.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.model or args.out or Path(tmp) / "starter"
        if args.model is None:
            build_starter(out, StarterConfig(seed=args.seed), progress=False)
        info = json.loads((out / "starter.json").read_text())
        build_s, build_cpu = info["metrics"]["build/seconds"], info["metrics"].get("build/cpu_seconds")
        model, tok = load_model_and_tokenizer(out)
        torch.set_num_threads(info["threads"])
        ev = evaluate(model, tok, progress=False)
        reply_s = time_reply(out)
    figures = {
        "build_seconds": build_s,
        "build_cpu_seconds": build_cpu,
        "threads": info["threads"],
        "config": info["config"],
        "rebuilt": args.model is None,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "parameters": info["metrics"]["model/parameters"],
        "stage_seconds": {k: v for k, v in info["metrics"].items() if k.endswith("/seconds")},
        **{k: ev[k] for k in ("per_skill", "mean", "min", "heldout_phrasing", "heldout_per_skill",
                              "unseen_name_recall", "unseen_name_recall_se", "system_prompt_heldout",
                              "system_prompt_heldout_se", "distinct_style_rate", "sampled_well_formed", "counts")},
        "reply_30_tokens_s": reply_s,
    }
    figures["targets_met"] = {
        k: (figures[k] <= bound if op == "<=" else figures[k] >= bound) for k, (op, bound) in TARGETS.items()
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main()
