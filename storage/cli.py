"""Command line for the chat database: export votes for training, print statistics, rate versions.

    python -m storage export --data-dir data --out votes.jsonl   # TRL preference pairs
    python -m storage stats  --data-dir data                     # votes, versions, rounds
    python -m storage stats  --data-dir data --settings          # ... and each round's settings
    python -m storage leaderboard --data-dir data [--json]       # versions rated from the votes

Only parses arguments and calls ``storage.Store`` and ``storage.leaderboard``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from storage.paths import DataDir, DataDirError
from storage.store import Store, open_store


def _existing_store(data_dir: Path) -> Store:
    try:
        return open_store(DataDir(data_dir).require())
    except DataDirError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_export(args: argparse.Namespace) -> int:
    """Write the vote pairs (what a round trains on) as JSONL to ``--out`` (``-`` for stdout)."""
    with _existing_store(args.data_dir) as store:
        if args.out == "-":
            count = store.export_jsonl(sys.stdout)
        else:
            count = store.export_jsonl(args.out)
    print(f"exported {count} preference pairs (ties marked \"tie\": true) to {args.out}", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print vote counts, the live version and the latest rounds."""
    with _existing_store(args.data_dir) as store:
        counts = store.vote_counts()
        print(
            "votes: "
            + " ".join(f"{k}={counts[k]}" for k in ("a", "b", "tie", "both_bad", "total", "pending"))
        )
        print(f"new votes since last trained round: {store.new_votes_since_last_round()}")
        pairs = store.vote_pairs()
        ties = sum(p["tie"] for p in pairs)
        print(f"training pairs: {len(pairs)} ({len(pairs) - ties} A/B, {ties} ties; what a round trains on and export writes)")
        print(f"live version: {store.live_version()}  (registered: {len(store.versions())})")
        rounds = store.rounds(limit=args.rounds)
        print(f"rounds (latest {len(rounds)}):")
        for r in rounds:
            metrics = json.dumps(r["metrics"], ensure_ascii=False) if r["metrics"] else ""
            print(
                f"  #{r['id']} {r['status']:<9} trigger={r['trigger']} version={r['version']} "
                f"votes={r['votes_used']} started={r['started_at']} {r['reason']} {metrics}".rstrip()
            )
            if args.settings and r.get("settings"):
                print(f"    settings: {json.dumps(r['settings'], ensure_ascii=False, sort_keys=True)}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Print the version leaderboard (``storage.leaderboard``) as a table, or as JSON."""
    from storage.leaderboard import format_table, leaderboard  # scipy and pandas: only here

    with _existing_store(args.data_dir) as store:
        try:
            rows = leaderboard(store, bootstrap=args.bootstrap, seed=args.seed,
                               confidence=args.confidence)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        print(f"Bradley–Terry ratings from the votes (the anchor, version 0 when rated, = 1000; +400 = 10:1 odds), "
              f"{100 * args.confidence:g}% bootstrap intervals over {args.bootstrap} resamples:")
        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m storage`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the training pairs (TRL format, ties marked) as JSONL")
    export.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with chat.db")
    export.add_argument("--out", default="votes.jsonl", help="output file, '-' for stdout")
    export.set_defaults(func=cmd_export)
    stats = sub.add_parser("stats", help="print vote counts, live version and rounds")
    stats.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with chat.db")
    stats.add_argument("--rounds", type=int, default=10, help="how many recent rounds to list")
    stats.add_argument("--settings", action="store_true", help="also print each round's settings")
    stats.set_defaults(func=cmd_stats)
    board = sub.add_parser("leaderboard", help="rate every policy version from the votes (Bradley–Terry)")
    board.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with chat.db")
    board.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    board.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    board.add_argument("--confidence", type=float, default=0.95, help="coverage of the intervals, in (0, 1)")
    board.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    board.set_defaults(func=cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
