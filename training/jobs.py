"""Command line of one training round (the steps are :mod:`training.round`'s)::

    python -m training.jobs --data-dir data --model data/starter

The app's scheduler runs exactly this in a child process, with the app's ``--round.*`` settings
as flags (``python -m training.jobs --help`` lists them). It refuses a ``--data-dir`` that is not
an app's data dir and a ``--model`` other than the data dir's base model, prints one summary
line, and exits with 1 when the round failed, 2 for bad flags.

On a terminal, PPO's iterations also show as a progress bar on stderr, the log lines printed
above it (still one per report); the bar is off whenever stderr is not a terminal (redirected,
or the app's child, whose output goes to the training log; :func:`training.progress.want_bar`),
and tqdm's own ``TQDM_DISABLE=1`` hides it on a terminal too.

It runs unchanged as a data-parallel round of N processes (:mod:`training.distributed`)::

    torchrun --nproc_per_node 2 -m training.jobs --data-dir data --model data/starter

(or ``accelerate launch --multi_gpu --num_processes 2 -m training.jobs …``, on the CPU too;
the app's ``--round-launcher``).
Rank 0 records and publishes the round and prints the summary line; every rank prints
``rank R adapter sha256=…``, the digest of the adapter it trained (equal on all ranks), and
exits with the same code. Each rank takes its share of the CPU threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

from storage.paths import DataDir, DataDirError
from storage.registry import AdapterRegistry
from storage.store import open_store
from training import distributed
from training.console import quiet_library_noise
from training.flags import add_dataclass_args, dataclass_from_args
from training.progress import want_bar
from training.round import RoundConfig, run_round


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m training.jobs``: every field of :class:`RoundConfig`, and ``--trigger``."""
    # no abbreviations: "--data x" must not pass for --data-dir
    parser = argparse.ArgumentParser(prog="python -m training.jobs", description=__doc__.split("\n")[0],
                                     usage="%(prog)s --data-dir DIR --model MODEL [options]", allow_abbrev=False)
    parser.add_argument("--trigger", default="manual", help="who started the round, recorded with it (default: manual)")
    add_dataclass_args(parser, RoundConfig)
    return parser


class Terminated(RuntimeError):
    """SIGTERM arrived (the app stopped or died): the round ends as failed, its staging removed."""


def _terminate(signum, frame):
    raise Terminated(f"stopped by signal {signal.Signals(signum).name} (the app stopped or died)")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 0 unless the round failed (1) or the flags are bad (2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(RoundConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not config.model:
        parser.error("--model is required (a hub id or a local model directory)")
    data_dir = DataDir(config.data_dir)
    try:
        data_dir.require()
        data_dir.check_model(config.model)
    except DataDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    distributed.init(config.load.device)
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,  # rank 0 tells the round
                        format=f"%(asctime)s %(levelname)s {f'[rank {rank}] ' if world > 1 else ''}%(message)s")
    quiet_library_noise()
    torch.set_num_threads(config.threads or max(1, ((os.cpu_count() or 2) - 1) // world))
    store = open_store(data_dir)
    signal.signal(signal.SIGTERM, _terminate)  # recorded as a failed round, never a half-published one
    registry = AdapterRegistry(data_dir, store)
    if want_bar() and rank == 0:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the bar, not through it
            result = run_round(config, store, registry, trigger=args.trigger, progress_bar=True)
    else:
        result = run_round(config, store, registry, trigger=args.trigger)
    if rank == 0:
        print(f"round {result['id']}: {result['status']} {result['reason'] or ''} version={result['version']}")
    if "adapter_digest" in result:
        print(f"rank {rank} adapter sha256={result['adapter_digest']}", flush=True)
    failed = result["status"] == "failed"
    if not failed:  # a failed rank 0 leaves at once: the others may wait in a collective it left
        distributed.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
