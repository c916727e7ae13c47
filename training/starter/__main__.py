"""Build the starter model: ``python -m training.starter --out data/starter --seed 0``.

Every field of :class:`training.starter.build.StarterConfig` is a flag (``--hidden-size``,
``--sft-steps``, …). Prints progress bars and one summary line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.flags import add_dataclass_args, dataclass_from_args, parse_bool
from training.starter.build import StarterConfig, build_starter


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.starter", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/starter"), help="output directory (default: data/starter)")
    parser.add_argument("--quiet", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL",
                        help="no progress bars or summary line")
    add_dataclass_args(parser, StarterConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(StarterConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    return build_starter(args.out, config, progress=not args.quiet)


if __name__ == "__main__":
    main()
