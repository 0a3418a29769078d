"""Regenerate (or, with --check, verify) README.md's table of MFTCConfig fields from their help metadata."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mftc_peft.config_table import update_readme

README = Path(__file__).resolve().parent.parent / "README.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is out of date; change nothing")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    current = update_readme(args.readme, check=args.check)
    if args.check and not current:
        print(f"{args.readme}: the MFTCConfig table is out of date: run python scripts/config_table.py",
              file=sys.stderr)
        return 1
    print(f"{args.readme}: table {'up to date' if current else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
