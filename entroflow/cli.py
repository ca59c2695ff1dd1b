"""`entroflow` command line: `entroflow check-config FILE...` validates configs without Snakemake.

Snakemake reports a malformed YAML config without the file or line; this names both, then checks
the schema and cross-references exactly as the workflow does.
"""

from __future__ import annotations

import argparse
import sys

from entroflow.errors import EntroflowError


def check_config(paths: list[str]) -> int:
    from entroflow.config import load_config

    failed = 0
    for path in paths:
        try:
            config = load_config(path)
        except EntroflowError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{path}: ok ({len(config['experiments'])} experiments, {len(config['runs'])} runs, "
            f"{len(config['datasets'])} datasets, {len(config['models'])} models)"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entroflow", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate workflow config files")
    check.add_argument("paths", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.paths)
    return 2


if __name__ == "__main__":
    sys.exit(main())
