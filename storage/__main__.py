"""Entry point for ``python -m storage``; see ``storage/cli.py``."""

from storage.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
