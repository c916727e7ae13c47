"""The one training loop shared by pre-training, SFT of the starter model and ``training.sft``.

Examples are token ids with labels (``-100`` = no loss). They are packed several to a row;
``position_ids`` restart at 0 for every example and no attention mask is passed, which makes
transformers build a block-diagonal causal mask, so packed examples never attend to each other
and no compute is wasted on padding. The loop is plain AdamW with linear warm-up and cosine
decay, one function read top to bottom.

Also here: generating ``argparse`` flags from a config dataclass (``add_config_args`` /
``config_from_args``), so a job's flags are never written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
from collections.abc import Iterator

import torch

IGNORE = -100  # label of tokens that carry no loss


# ------------------------------------------------------------------ CLI from a dataclass -------
def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; help from ``field(metadata={"help": …})``."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_)


def config_from_args(cls, args: argparse.Namespace):
    """An instance of ``cls`` from the flags that were given (others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


# ------------------------------------------------------------------ examples and packing -------
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
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):  # template without {% generation %}: find assistant spans by prefixes
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_ids(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)))
            end = len(_ids(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True)))
            mask[start:end] = [1] * (end - start)
        if not any(mask):
            raise ValueError("the chat template renders no assistant tokens for this conversation")
    return ids, [i if m else IGNORE for i, m in zip(ids, mask, strict=True)]


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


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
@dataclasses.dataclass
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
    for step in bar:
        batch = next(batches)  # (B, 3, T)
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
