"""`entroflow` command line.

- `entroflow check-config FILE...` validates configs without Snakemake. Snakemake reports a
  malformed YAML config without the file or line; this names both, then checks the schema and
  cross-references exactly as the workflow does.
- `entroflow view PATH [--host H] [--port P]` serves the entropy viewer for a trace directory
  (or a run folder) or an entropy .h5 file.
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
    view = commands.add_parser("view", help="browse a trace directory or entropy file in a browser")
    view.add_argument("path", help="trace directory, run folder, or entropy .h5 file")
    view.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)"
    )
    view.add_argument("--port", type=int, default=8050, help="port (default: %(default)s)")
    view.add_argument("--debug", action="store_true", help="Dash debug mode (reloads on edits)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.paths)
    if args.command == "view":
        return view_path(args.path, args.host, args.port, args.debug)
    return 2


def view_path(path: str, host: str, port: int, debug: bool) -> int:
    try:
        from entroflow.viewer.app import serve
    except ImportError as err:
        print(
            f"error: the viewer needs the 'viewer' extra (pip install 'entroflow[viewer]'): {err}",
            file=sys.stderr,
        )
        return 1
    try:
        serve(path, host, port, debug)
    except EntroflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
