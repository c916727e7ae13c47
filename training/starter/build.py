"""Build the offline starter model: corpus → tokenizer → pre-training → SFT → save.

Stages 1–2 of the ChatGPT recipe at toy scale, on CPU, in a few minutes:

1. generate documents and conversations (:mod:`training.starter.corpus`, seeded);
2. train a byte-level BPE tokenizer on them (:mod:`training.starter.tokenizer`);
3. pre-train a small Llama (``transformers.LlamaForCausalLM``) on packed documents, loss on
   every token;
4. SFT on packed conversations, loss on assistant tokens only (end-of-turn included);
5. save with ``save_pretrained`` (model, tokenizer, generation config whose ``eos_token_id`` is
   ``<|end|>``) plus ``starter.json`` (config, seed, metrics), into a temporary directory that
   is renamed into place, so a crash never leaves a half-written model.

Run: ``python -m training.starter --out data/starter --seed 0`` (``--help`` lists every knob).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from training.flags import help_field

STARTER_JSON = "starter.json"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", STARTER_JSON)
# The stages of a build, in order, as ``on_progress`` names them (see :func:`build_starter`).
STAGES = ("generating the corpus", "training the tokenizer", "pre-training", "supervised fine-tuning",
          "saving", "evaluating")
ProgressFn = Callable[[str, int, int], None]
"""``on_progress(stage, done, total)``: ``stage`` one of :data:`STAGES`, ``done`` of ``total`` units."""


@dataclass
class StarterConfig:
    """Sizes and budgets of the starter build (build time and accuracy: docs/benchmarks.md).

    ``sft_steps`` is about two passes over the SFT conversations: a model that is often wrong
    when sampled at temperature 1 makes comparisons mostly show sampling noise."""

    seed: int = help_field(0, help="seed of the corpus, initialisation and batch order")
    vocab_size: int = help_field(1024, help="BPE vocabulary size, special tokens included")
    hidden_size: int = help_field(128, help="model width")
    num_layers: int = help_field(4, help="transformer blocks")
    num_heads: int = help_field(4, help="attention heads (hidden_size must divide evenly)")
    intermediate_size: int = help_field(384, help="SwiGLU MLP width")
    max_position_embeddings: int = help_field(512, help="context window in tokens")
    n_documents: int = help_field(20000, help="pre-training documents to generate")
    n_conversations: int = help_field(40000, help="SFT conversations to generate")
    seq_len: int = help_field(256, help="packed row length in tokens")
    batch_size: int = help_field(16, help="packed rows per optimizer step")
    pretrain_steps: int = help_field(300, help="pre-training optimizer steps (0 skips)")
    pretrain_lr: float = help_field(3e-3, help="peak learning rate of pre-training")
    sft_steps: int = help_field(1200, help="SFT optimizer steps")
    sft_lr: float = help_field(3e-3, help="peak learning rate of SFT")
    warmup_frac: float = help_field(0.05, help="fraction of each stage's steps spent warming up")
    weight_decay: float = help_field(0.01, help="AdamW weight decay on matrices")
    eval_per_skill: int = help_field(10, help="greedy eval prompts per skill for starter.json (0: none)")
    num_threads: int = help_field(0, help="torch CPU threads (0: all cores, at most 8)")

    def __post_init__(self):
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_position_embeddings", "n_documents", "n_conversations", "seq_len",
                    "batch_size", "sft_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"StarterConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["pretrain_steps", "eval_per_skill", "num_threads"]:
            if getattr(self, name) < 0:
                raise ValueError(f"StarterConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size <= 262:
            raise ValueError(f"StarterConfig.vocab_size must be > 262 (bytes + special tokens), got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}")
        for name in ["pretrain_lr", "sft_lr"]:
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"StarterConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"StarterConfig.warmup_frac must be in [0, 1), got {self.warmup_frac}")


def _threads(config: StarterConfig) -> int:
    return config.num_threads or min(8, os.cpu_count() or 1)


@contextmanager
def _counting_steps(model, stage: str, total: int, on_progress: ProgressFn | None) -> Iterator[None]:
    """Report ``(stage, done, total)`` to ``on_progress`` at the start (``done`` 0) and after each
    forward pass of ``model`` (:func:`training.sft.train` makes one per optimizer step); the hook
    is removed on exit."""
    if on_progress is None:
        yield
        return
    done = 0
    on_progress(stage, 0, total)

    def after_forward(module, args, output):
        nonlocal done
        done += 1
        on_progress(stage, done, total)

    handle = model.register_forward_hook(after_forward)
    try:
        yield
    finally:
        handle.remove()


def _train_into(tmp: Path, config: StarterConfig, progress: bool, on_progress: ProgressFn | None = None) -> dict:
    """Stages 1–4 of the module docstring; saves model + tokenizer into ``tmp``; returns metrics.
    ``on_progress`` gets each of :data:`STAGES` as it starts and ends (see :func:`build_starter`)."""
    report = on_progress or (lambda stage, done, total: None)
    report(STAGES[0], 0, 2)  # before the imports below, which take seconds on a busy machine
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.sft import (
        LoopSettings,
        encode_conversation,
        encode_document,
        pack,
        train,
    )
    from training.starter import corpus
    from training.starter.tokenizer import train_tokenizer

    t0, cpu0 = time.perf_counter(), time.process_time()
    # 1. corpus
    docs = corpus.generate_documents(config.seed, config.n_documents)
    report(STAGES[0], 1, 2)
    convs = corpus.generate_conversations(config.seed, config.n_conversations)
    report(STAGES[0], 2, 2)
    # 2. tokenizer, on documents and every message of the conversations; then the packed rows
    report(STAGES[1], 0, 3)
    texts = docs + [m["content"] for c in convs for m in c["messages"]]
    tok = train_tokenizer(texts, vocab_size=config.vocab_size)
    report(STAGES[1], 1, 3)
    doc_rows = pack([encode_document(tok, d) for d in docs], config.seq_len, tok.pad_token_id, config.seed)
    report(STAGES[1], 2, 3)
    conv_rows = pack([encode_conversation(tok, c["messages"]) for c in convs], config.seq_len,
                     tok.pad_token_id, config.seed)
    report(STAGES[1], 3, 3)
    metrics = {"data/seconds": time.perf_counter() - t0, "data/doc_rows": len(doc_rows),
               "data/conv_rows": len(conv_rows)}
    # 3. model from a Llama config
    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_config)
    metrics["model/parameters"] = sum(p.numel() for p in model.parameters())
    common = {"batch_size": config.batch_size, "warmup_frac": config.warmup_frac,
              "weight_decay": config.weight_decay, "seed": config.seed}
    # 4. pre-training on documents (every token), then SFT on conversations (assistant tokens)
    if config.pretrain_steps:
        settings = LoopSettings(steps=config.pretrain_steps, lr=config.pretrain_lr, **common)
        with _counting_steps(model, STAGES[2], config.pretrain_steps, on_progress):
            metrics |= train(model, doc_rows, settings, desc="pretrain", progress=progress)
    settings = LoopSettings(steps=config.sft_steps, lr=config.sft_lr, **common)
    with _counting_steps(model, STAGES[3], config.sft_steps, on_progress):
        metrics |= train(model, conv_rows, settings, desc="sft", progress=progress)
    # 5. save: generation stops at end of turn
    report(STAGES[4], 0, 1)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    report(STAGES[4], 1, 1)
    if config.eval_per_skill:
        from training.starter.eval import evaluate

        report(STAGES[5], 0, 1)
        ev = evaluate(model, tok, seed=config.seed + 1, n_per_skill=config.eval_per_skill,
                      n_heldout=0, n_unseen_names=0, n_system=0, n_style_prompts=0, progress=False)
        report(STAGES[5], 1, 1)
        metrics |= {"eval/mean": ev["mean"], "eval/min": ev["min"]}
        metrics |= {f"eval/{k}": v for k, v in ev["per_skill"].items()}
    metrics["build/seconds"] = time.perf_counter() - t0
    metrics["build/cpu_seconds"] = time.process_time() - cpu0  # > seconds × threads: cores were shared
    return metrics


def build_starter(out_dir: Path, config: StarterConfig | None = None, progress: bool = True,
                  on_progress: ProgressFn | None = None) -> Path:
    """Build the starter model into ``out_dir`` and return ``out_dir``.

    Writes ``save_pretrained`` files of the model and tokenizer and ``starter.json``
    (``{"config", "seed", "metrics"}``). Everything is written into a temporary sibling
    directory that replaces ``out_dir`` only when complete (an exception, Ctrl-C included,
    removes it and leaves ``out_dir`` as it was). Deterministic for a config (same seed, same
    thread count → same weights).

    Args:
        progress: tqdm bars on stderr for the training stages, and a summary line at the end.
        on_progress: called in the building thread as ``on_progress(stage, done, total)``: each
            of :data:`STAGES` in order (pre-training left out with ``pretrain_steps=0``,
            evaluating with ``eval_per_skill=0``), first with ``done=0``, last with
            ``done=total``; the two training stages count optimizer steps (``total`` =
            ``pretrain_steps`` / ``sft_steps``, one call per step), the others their parts.
    """
    config = config or StarterConfig()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_threads(config))
    try:
        metrics = _train_into(tmp, config, progress, on_progress)
        info = {"config": dataclasses.asdict(config), "seed": config.seed, "threads": _threads(config),
                "metrics": metrics}
        (tmp / STARTER_JSON).write_text(json.dumps(info, indent=2) + "\n")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads_before)
    if progress:
        m = metrics
        eval_part = f", greedy exact-match {m['eval/mean']:.1%} (weakest {m['eval/min']:.1%})" if "eval/mean" in m else ""
        print(
            f"starter: {m['model/parameters'] / 1e6:.2f}M params, built in {m['build/seconds']:.0f}s "
            f"(pretrain loss {m.get('pretrain/loss', float('nan')):.3f}, sft loss {m['sft/loss']:.3f}"
            f"{eval_part}) -> {out_dir}"
        )
    return out_dir


def starter_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a complete, loadable starter, or ``None`` if it is.

    Checks every file without building the model (the app then loads it once): ``starter.json``,
    ``config.json`` and ``generation_config.json`` parse, the tokenizer loads with a chat template that renders, and
    ``model.safetensors`` reads in full (a truncated or garbled file fails). A build is renamed
    into place only when complete, so these catch what damages a finished one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return "missing"
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        return f"incomplete (no {', '.join(missing)})"
    try:
        from safetensors.torch import load_file
        from transformers import AutoConfig, GenerationConfig

        from training.models import load_tokenizer

        json.loads((model_dir / STARTER_JSON).read_text())
        AutoConfig.from_pretrained(model_dir)
        GenerationConfig.from_pretrained(model_dir)
        load_tokenizer(model_dir)
        load_file(model_dir / "model.safetensors")
    except Exception as exc:  # noqa: BLE001 - any failure to load means "rebuild"
        return f"corrupt ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


# settings that do not change the weights
_NOT_RECIPE = ("num_threads", "eval_per_skill")


def recipe_changes(model_dir: Path, config: StarterConfig) -> dict[str, tuple]:
    """Settings of ``config`` that differ from those ``model_dir``'s ``starter.json`` records:
    ``{name: (built with, now)}``; settings that do not change the weights are left out.

    Raises:
        OSError, ValueError: ``starter.json`` is missing or not JSON.
    """
    built = json.loads((Path(model_dir) / STARTER_JSON).read_text()).get("config", {})
    now = dataclasses.asdict(config)
    return {k: (built[k], v) for k, v in now.items() if k not in _NOT_RECIPE and k in built and built[k] != v}


def ensure_starter(out: Path, config: StarterConfig | None = None, progress: bool = True,
                   on_progress: ProgressFn | None = None) -> Path:
    """Return ``out`` (a data dir's ``DataDir.starter``) if it is a complete, loadable starter;
    else (re)build it there (``progress``, ``on_progress``: see :func:`build_starter`).

    A missing or corrupt directory is rebuilt after a one-line message; it is never half-loaded.
    One built with other settings than ``config`` (an older recipe) is kept, since the adapters
    and reward models of the data dir were trained on it, with a one-line note on how to rebuild.
    """
    out = Path(out)
    problem = starter_problem(out)
    if problem is None:
        changes = recipe_changes(out, config or StarterConfig())
        if changes:
            was = ", ".join(f"{k}={a}" for k, (a, _) in changes.items())
            now = ", ".join(f"{k}={b}" for k, (_, b) in changes.items())
            print(f"note: the starter model at {out} was built with {was}; the current recipe has {now}. "
                  f"It is kept (this data dir's adapters were trained on it); `python -m training.starter "
                  f"--out {out}` rebuilds it, after which those adapters no longer fit.", flush=True)
        return out
    print(f"starter model at {out} is {problem}; building it (a few minutes on CPU)", flush=True)
    return build_starter(out, config, progress=progress, on_progress=on_progress)
