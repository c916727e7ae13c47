"""Demonstrations: encoding, packing and training on conversations; and stage 2 for any model.

Everything that learns from demonstration conversations goes through here: the starter's
pre-training and SFT (:mod:`training.starter.build`), PPO-ptx's demonstrations and rejection
sampling's best-of-n answers (:class:`DemonstrationBatches`), and supervised fine-tuning on a
user's own conversations, full or LoRA::

    python -m training.sft --model data/starter --data conversations.jsonl --out data/sft
    python -m training.sft --model data/starter --data conversations.jsonl --lora --out data/sft-lora

``--data`` is JSONL, one conversation per line: ``{"messages": [{"role": "user", "content":
"…"}, {"role": "assistant", "content": "…"}, …]}`` with roles ``system`` / ``user`` /
``assistant`` and at least one assistant message. Lines that are not valid conversations are
reported with their line numbers and skipped; ``--strict`` refuses the whole file instead.

Loss is on assistant tokens only (end-of-turn included). Examples are token ids with labels
(``-100`` = no loss). For SFT they are packed several to a row; ``position_ids`` restart at 0
for every example and no attention mask is passed, which makes transformers build a
block-diagonal causal mask, so packed examples never attend to each other and no compute is
wasted on padding. The loop (:func:`train`) is plain AdamW with linear warm-up and cosine
decay. The output of ``python -m training.sft`` holds ``save_pretrained`` files (the full model,
or only the LoRA adapter with ``--lora``), the tokenizer and ``sft.json`` (config and metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.store import ROLES
from training.chat_format import render_conversation, template_messages
from training.flags import help_field, parse_config
from training.rollout import right_pad
from training.seeds import derive_seed

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss (PyTorch's cross-entropy ignore_index)


class SftDataError(ValueError):
    """The ``--data`` file is unusable (missing, empty, or has bad lines under ``--strict``)."""


@dataclass
class SftConfig:
    """Supervised fine-tuning of any causal LM on ``messages`` JSONL."""

    model: str = help_field("", help="base model: hub id or directory (required)")
    data: str = help_field("", help="conversations JSONL, one {\"messages\": [...]} per line (required)")
    out: str = help_field("", help="output directory (required)")
    lora: bool = help_field(False, help="train a LoRA adapter instead of all weights")
    strict: bool = help_field(False, help="refuse the file if any line is not a valid conversation")
    epochs: float = help_field(3.0, help="passes over the data (ignored when --steps > 0)")
    steps: int = help_field(0, help="optimizer steps (0: from --epochs)")
    lr: float = help_field(0.0, help="peak learning rate (0: 1e-3 for LoRA, 3e-4 full)")
    batch_size: int = help_field(8, help="packed rows per step")
    seq_len: int = help_field(512, help="packed row length (capped at the context window)")
    lora_r: int = help_field(8, help="LoRA rank")
    lora_alpha: int = help_field(16, help="LoRA scaling numerator (update × alpha / r)")
    seed: int = help_field(0, help="seed of packing, batch order and LoRA init")
    num_threads: int = help_field(0, help="torch CPU threads (0: leave as is)")

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


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and SFT labels: the ids on assistant tokens (the
    end-of-turn token included, so the model learns to stop), ``IGNORE`` everywhere else.

    Uses the chat template's ``{% generation %}`` marks where it has them (the starter's does);
    otherwise (many hub templates) each assistant turn is the token span between the prompt
    rendered up to it with ``add_generation_prompt=True`` and the prompt including it.

    Raises:
        ValueError: the conversation has no assistant message, or the template renders an
            assistant turn in a way that leaves no assistant tokens.
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant reply to learn from")
    messages = template_messages(tokenizer, messages)
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):  # template without {% generation %}: find assistant spans by prefixes
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render_conversation(tokenizer, messages[:k], add_generation_prompt=True))
            end = len(render_conversation(tokenizer, messages[: k + 1]))
            mask[start:end] = [1] * (end - start)
        if not any(mask):
            raise ValueError("the chat template renders no assistant tokens for this conversation")
    return ids, [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]


def demonstrations(tokenizer, conversations: list[list[dict]], max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_conversation` of each conversation, for :class:`DemonstrationBatches`;
    conversations with no assistant tokens under this template, and those longer than
    ``max_tokens`` (the model's context window; logged), are left out."""
    out, too_long = [], 0
    for messages in conversations:
        try:
            ids, labels = encode_conversation(tokenizer, messages)
        except ValueError:
            continue  # no assistant tokens under this template: nothing to learn from
        if max_tokens is not None and len(ids) > max_tokens:
            too_long += 1
            continue
        out.append((ids, labels))
    if too_long:
        log.warning("%d demonstration(s) longer than the %d-token context window left out", too_long, max_tokens)
    return out


def encode_document(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``<|bos|>`` + the text's ids + end-of-turn; every token but the first carries loss."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.eos_token_id)
    return ids, [IGNORE] + ids[1:]


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int) -> torch.Tensor:
    """Pack shuffled examples greedily into rows of ``seq_len`` tokens.

    Examples longer than ``seq_len`` are cut. Labels are un-shifted (the model shifts them).

    Returns:
        ``(N, 3, seq_len)`` long tensor: ``[:, 0]`` input ids, ``[:, 1]`` labels, ``[:, 2]``
        position ids, which restart at 0 at every example (and at the padding that ends a row).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows, cur = [], ([], [], [])

    def flush():
        ids, labels, pos = cur
        n = seq_len - len(ids)
        rows.append([ids + [pad_id] * n, labels + [IGNORE] * n, pos + list(range(n))])

    for i in order:
        ids, labels = examples[i]
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(cur[0]) + len(ids) > seq_len:
            flush()
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(labels)
        cur[2].extend(range(len(ids)))
    if cur[0]:
        flush()
    return torch.tensor(rows, dtype=torch.long)


def _batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs over ``rows`` in a seeded order; ``(B, 3, T)`` each."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(rows), generator=g)
        for s in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[perm[s : s + batch_size]]
        if len(rows) < batch_size:
            yield rows


# ------------------------------------------------------------------ the loop -------------------
@dataclass
class LoopSettings:
    """Optimisation settings for :func:`train`."""

    steps: int  # optimizer steps
    batch_size: int  # packed rows per step
    lr: float  # peak learning rate (after warm-up)
    warmup_frac: float = 0.05  # fraction of steps with a linear warm-up from 0
    min_lr_frac: float = 0.05  # the cosine decay ends at lr * min_lr_frac
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (not norms / biases)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    seed: int = 0  # batch order


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warm-up to ``s.lr`` then cosine decay to ``s.lr * s.min_lr_frac``."""
    warm = max(1, int(s.warmup_frac * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, rows: torch.Tensor, s: LoopSettings, desc: str = "train", progress: bool = True) -> dict:
    """Train ``model`` in place on packed ``rows`` (from :func:`pack`) for ``s.steps`` steps.

    Only parameters with ``requires_grad`` are optimised (so a peft LoRA model trains only its
    adapter). Returns metrics ``{f"{desc}/loss", f"{desc}/tokens_per_s", f"{desc}/seconds"}``
    where the loss is the mean over the last 10 % of steps.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    batches = _batches(rows, s.batch_size, s.seed)
    losses, tokens, t0 = [], 0, time.perf_counter()
    bar = tqdm(range(s.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    device = next(model.parameters()).device
    for step in bar:
        batch = next(batches).to(device)  # (B, 3, T)
        ids, labels, pos = batch[:, 0], batch[:, 1], batch[:, 2]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        # attention_mask=None + restarting position_ids -> block-diagonal causal mask (packing)
        loss = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += ids.numel()
        if step % 10 == 0 or step == s.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, s):.1e}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    return {f"{desc}/loss": sum(tail) / len(tail), f"{desc}/tokens_per_s": tokens / seconds,
            f"{desc}/seconds": seconds}


class DemonstrationBatches:
    """Right-padded minibatches of ``(ids, labels)`` token lists (labels ``-100`` where no loss),
    drawn in a shuffled cycle; :meth:`loss` is their mean token NLL under a model."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int, device):
        if not examples:
            raise ValueError("DemonstrationBatches needs at least one example")
        self.examples, self.batch_size, self.pad_id, self.device = examples, batch_size, pad_id, device
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def loss(self, model) -> torch.Tensor:
        """Mean NLL (nats per labelled token) of the next ``batch_size`` examples; scalar with grad."""
        while len(self.order) < self.batch_size:
            idx = list(range(len(self.examples)))
            self.rng.shuffle(idx)
            self.order += idx
        take, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        rows = [self.examples[i] for i in take]
        ids, mask = right_pad([row_ids for row_ids, _ in rows], self.pad_id)  # (b, T)
        labels, _ = right_pad([row_labels for _, row_labels in rows], IGNORE)  # (b, T)
        logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits  # (b, T, V)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].to(self.device).reshape(-1),
            ignore_index=IGNORE)


def run_sft(config: SftConfig, progress: bool = True) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` and save into ``config.out``.

    Returns ``sft.json``'s content: ``{"config", "skipped_lines", "metrics"}``.

    Raises:
        SftDataError: see :func:`read_conversations`.
        training.models.ModelLoadError: the model cannot be loaded.
    """
    from training.models import LoraSettings, add_lora, context_window, load_model_and_tokenizer

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



def ptx_demonstrations(config, tokenizer, max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Demonstrations for a round's PPO-ptx (``config``: its
    :class:`training.round.RoundConfig`) as ``(ids, labels)`` (loss on assistant tokens only): the
    conversations of ``config.ptx_data``, or, without it, the starter's SFT corpus when
    ``config.model`` is a starter directory (regenerated from its recipe, not stored); else
    none. At most ``config.ptx_examples``; none when ``config.ppo.ptx_coef`` is 0. Conversations
    longer than ``max_tokens`` (the model's context window) are left out, with a log line.

    Raises:
        SftDataError: ``ptx_data`` is missing, empty or holds no valid conversation.
    """
    if config.ppo.ptx_coef <= 0:
        return []
    from training.starter.build import STARTER_JSON

    if config.ptx_data:
        conversations, _bad = read_conversations(config.ptx_data)
    elif (Path(config.model) / STARTER_JSON).is_file():
        from training.starter.corpus import generate_conversations

        seed = derive_seed(config.seed, "ptx/corpus")
        conversations = [c["messages"] for c in generate_conversations(seed, config.ptx_examples)]
    else:
        log.info("PPO-ptx off: no --ptx-data and the model is not the starter")
        return []
    return demonstrations(tokenizer, conversations[: config.ptx_examples], max_tokens)


def main(argv: list[str] | None = None) -> int:
    """Command line; exit code 0, or 2 for bad flags, data or model."""
    from training.models import ModelLoadError

    parser = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n")[0])
    config = parse_config(SftConfig, argv, parser)
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
