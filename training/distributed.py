"""Data-parallel training rounds across processes: ``torchrun`` / ``accelerate launch``.

A round started as ``torchrun --nproc_per_node N -m training.jobs …`` runs the same steps in N
processes (*ranks*). Every rank holds the whole model; what is split is the work:

- the reward model's batches and PPO's rollouts are *sharded* (:func:`shard`): each rank
  computes its part of a batch;
- their gradients are summed over ranks before every optimizer step (:func:`sum_gradients`),
  each rank's loss already weighted by its share of the whole batch, so the step is the one a
  single process would take on that batch (data parallelism as in PyTorch's
  ``DistributedDataParallel``, without its wrapper: peft adapters and a shared base would need
  ``find_unused_parameters`` and buckets for a handful of LoRA tensors);
- the trainable weights start from rank 0's (:func:`broadcast_tensors`) and, with identical
  steps, stay identical on every rank;
- rank 0 alone reads the votes and prompts (:func:`agree` sends them to the others), writes the
  database, runs the gate and publishes; a data-dependent choice every rank must make alike (stop
  PPO now, keep the new reward model) is rank 0's, sent to all.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) every function here is the
identity or a no-op, and a round is the single process it always was.

The backend is gloo on the CPU and NCCL when the round trains on CUDA
(https://pytorch.org/docs/stable/distributed.html). Collective calls block until every rank
makes them: a rank that fails leaves the others waiting until ``torchrun`` stops them (it ends
every rank when one exits with an error) or the process group's timeout passes.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_MIN = 60.0  # a collective waits this long for a lost rank before raising


def launched() -> bool:
    """True when this process was started by a launcher for more than one process
    (``WORLD_SIZE`` > 1 in the environment, as ``torchrun`` and ``accelerate launch`` set it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> None:
    """Join the launcher's process group (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``) unless there is none or it is already joined. ``device``: the
    round's ``--device``; a CUDA device takes NCCL and this rank's ``LOCAL_RANK`` GPU.

    Raises:
        RuntimeError / ValueError: the launcher's environment is incomplete or the rendezvous fails.
    """
    if not launched() or dist.is_initialized():
        return
    backend = "gloo"
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    log.info("rank %d of %d joined the round's process group (%s)", rank(), world_size(), backend)


def close() -> None:
    """Leave the process group (end of a round); no-op without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the round (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 … world_size() − 1 (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the one rank that writes the database, gates and publishes."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous part of ``items``; the parts of all ranks, in rank order, are
    ``items`` again. Sizes differ by at most one (a part may be empty)."""
    n, w, r = len(items), world_size(), rank()
    start, stop = n * r // w, n * (r + 1) // w
    return list(items[start:stop])


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object; what the others pass is ignored)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(values: list[T]) -> list[T]:
    """Every rank's ``values`` concatenated in rank order, on every rank (picklable items)."""
    if world_size() == 1:
        return list(values)
    parts: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64), on every rank."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def mean_floats(row: dict[str, float]) -> dict[str, float]:
    """``row``'s values averaged over ranks (same keys on every rank, in any order)."""
    if world_size() == 1:
        return dict(row)
    keys = sorted(row)
    total = sum_floats([row[k] for k in keys])
    return {k: v / world_size() for k, v in zip(keys, total, strict=True)}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> None:
    offset = 0
    for t in like:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient with its sum over ranks (a missing one counts as
    zeros: a rank whose part of the batch was empty). One all-reduce of the flattened
    gradients. Call after backward, before clipping and the optimizer step; each rank's loss
    must already carry its share of the batch (the sum is then the whole batch's gradient)."""
    params = [p for p in params if p.requires_grad]
    if world_size() == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flat(grads).to(grads[0].device)
    dist.all_reduce(flat)
    _unflat(flat, grads)


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (in place) with rank 0's: every rank then starts a training loop
    from the same weights."""
    tensors = list(tensors)
    if world_size() == 1 or not tensors:
        return
    flat = _flat(tensors).to(tensors[0].device)
    dist.broadcast(flat, src=0)
    _unflat(flat, tensors)


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of tensors' names and exact bytes, in name order: equal on two ranks exactly
    when their weights are bit-identical (the check that data parallelism kept them in step)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RemoteFailure(RuntimeError):
    """A step that rank 0 runs for every rank (:func:`on_main`) failed there."""


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 alone (a database read, a round's row), its result
    sent to every rank. An exception there is re-raised on rank 0 and, on the others, as the
    same class with the same message (:class:`RemoteFailure` when that class cannot be built
    from a message), so every rank takes the same branch."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then re-raised
            error = exc
    result, failure = agree((result, None if error is None else (type(error), str(error))))
    if error is not None:
        raise error
    if failure is not None:
        cls, message = failure
        try:
            remote = cls(message)
        except Exception:  # noqa: BLE001 - a class that takes other arguments
            remote = RemoteFailure(f"{cls.__name__}: {message}")
        raise remote
    return result
