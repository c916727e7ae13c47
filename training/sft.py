"""Stage 2 for any model: supervised fine-tuning on a user's own conversations, full or LoRA.

Run::

    python -m training.sft --model data/starter --data conversations.jsonl --out data/sft
    python -m training.sft --model data/starter --data conversations.jsonl --lora --out data/sft-lora

``--data`` is JSONL, one conversation per line: ``{"messages": [{"role": "user", "content":
"…"}, {"role": "assistant", "content": "…"}, …]}`` with roles ``system`` / ``user`` /
``assistant`` and at least one assistant message. Lines that are not valid conversations are
reported with their line numbers and skipped; ``--strict`` refuses the whole file instead.

Loss is on assistant tokens only (end-of-turn included). Conversations are packed several to a
row (:mod:`training.starter.loop`). The output holds ``save_pretrained`` files (the full model,
or only the LoRA adapter with ``--lora``), the tokenizer and ``sft.json`` (config and metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")


class SftDataError(ValueError):
    """The ``--data`` file is unusable (missing, empty, or has bad lines under ``--strict``)."""


@dataclass
class SftConfig:
    """Supervised fine-tuning of any causal LM on ``messages`` JSONL."""

    model: str = field(default="", metadata={"help": "base model: hub id or directory (required)"})
    data: str = field(default="", metadata={"help": "conversations JSONL, one {\"messages\": [...]} per line (required)"})
    out: str = field(default="", metadata={"help": "output directory (required)"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    strict: bool = field(default=False, metadata={"help": "refuse the file if any line is not a valid conversation"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the data (ignored when --steps > 0)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0: 1e-3 for LoRA, 3e-4 full)"})
    batch_size: int = field(default=8, metadata={"help": "packed rows per step"})
    seq_len: int = field(default=512, metadata={"help": "packed row length (capped at the context window)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (update × alpha / r)"})
    seed: int = field(default=0, metadata={"help": "seed of packing, batch order and LoRA init"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave as is)"})

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"SftConfig.epochs must be > 0, got {self.epochs}")
        for name in ["steps", "num_threads"]:
            if getattr(self, name) < 0:
                raise ValueError(f"SftConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ["batch_size", "seq_len", "lora_r"]:
            if getattr(self, name) < 1:
                raise ValueError(f"SftConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lr < 1:
            raise ValueError(f"SftConfig.lr must be in [0, 1), got {self.lr}")


def _problem(obj) -> str | None:
    """Why a parsed JSONL line is not a conversation, or ``None``."""
    if not isinstance(obj, dict) or "messages" not in obj:
        return 'not an object with a "messages" list'
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return '"messages" is not a non-empty list'
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {k} is not an object with a string \"content\""
        if m.get("role") not in ROLES:
            return f"message {k} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message to learn from"
    return None


def read_conversations(path: str | os.PathLike, strict: bool = False) -> tuple[list[list[dict]], list[tuple[int, str]]]:
    """Read ``messages`` JSONL. Blank lines are ignored.

    Returns:
        ``(conversations, problems)``: the valid conversations (lists of ``{"role", "content"}``)
        and ``(line_number, reason)`` for every skipped line, numbered from 1.

    Raises:
        SftDataError: the file is missing, holds no valid conversation, or (``strict``) has
            any bad line; the message lists the line numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"--data {path}: no such file; pass a JSONL file of {{\"messages\": [...]}} lines")
    convs, problems = [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((n, f"not valid JSON ({exc.msg})"))
                continue
            why = _problem(obj)
            if why:
                problems.append((n, why))
            else:
                convs.append([{"role": m["role"], "content": m["content"]} for m in obj["messages"]])
    listing = "; ".join(f"line {n}: {why}" for n, why in problems[:20])
    if problems and strict:
        raise SftDataError(f"{path}: {len(problems)} bad line(s), refusing (--strict): {listing}. "
                           "Fix those lines or drop --strict to skip them.")
    if not convs:
        raise SftDataError(f"{path}: no valid conversation" + (f" ({listing})" if listing else " (the file is empty)"))
    return convs, problems


def run_sft(config: SftConfig, progress: bool = True) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` and save into ``config.out``.

    Returns ``sft.json``'s content: ``{"config", "skipped_lines", "metrics"}``.

    Raises:
        SftDataError: see :func:`read_conversations`.
        training.models.ModelLoadError: the model cannot be loaded.
    """
    from training.models import LoraSettings, add_lora, context_window, load_model_and_tokenizer
    from training.starter.loop import LoopSettings, encode_conversation, pack, train

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    convs, problems = read_conversations(config.data, strict=config.strict)
    for n, why in problems:
        print(f"{config.data}: line {n} skipped: {why}", file=sys.stderr)
    model, tok = load_model_and_tokenizer(config.model)
    seq_len = min(config.seq_len, context_window(model))
    examples = [encode_conversation(tok, m) for m in convs]
    rows = pack(examples, seq_len, tok.pad_token_id, config.seed)  # (N, 3, T)
    steps = config.steps or max(1, math.ceil(config.epochs * len(rows) / config.batch_size))
    lr = config.lr or (1e-3 if config.lora else 3e-4)
    if config.lora:
        torch.manual_seed(config.seed)
        model = add_lora(model, LoraSettings(r=config.lora_r, alpha=config.lora_alpha))
    settings = LoopSettings(steps=steps, batch_size=min(config.batch_size, len(rows)), lr=lr, seed=config.seed)
    metrics = train(model, rows, settings, desc="sft", progress=progress)
    metrics |= {"sft/conversations": len(convs), "sft/rows": len(rows), "sft/steps": steps}
    info = {"config": dataclasses.asdict(config), "skipped_lines": [n for n, _ in problems], "metrics": metrics}
    # write into a temporary sibling, then rename into place
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "sft.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        kind = "LoRA adapter" if config.lora else "full model"
        print(f"sft: {len(convs)} conversations ({len(problems)} lines skipped), {steps} steps, "
              f"final loss {metrics['sft/loss']:.3f}, {metrics['sft/seconds']:.0f}s -> {kind} in {out}")
    return info


def main(argv: list[str] | None = None) -> int:
    from training.models import ModelLoadError
    from training.starter.loop import add_config_args, config_from_args

    parser = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n")[0])
    add_config_args(parser, SftConfig)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(SftConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("model", "data", "out"):
        if not getattr(config, name):
            parser.error(f"--{name} is required")
    try:
        run_sft(config)
    except (SftDataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
