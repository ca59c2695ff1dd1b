"""`entroflow` command line.

- `entroflow check-config FILE... [--models]` validates configs without Snakemake. Snakemake
  reports a malformed YAML config without the file or line; this names both, then checks the
  schema and cross-references exactly as the workflow does. `--models` also checks every local
  model folder (config.json, complete weights, tokenizer files, vocabulary sizes).
- `entroflow view PATH [--host H] [--port P]` serves the entropy viewer for a trace directory
  (or a run folder) or an entropy .h5 file.
"""

from __future__ import annotations

import argparse
import sys

from entroflow.errors import EntroflowError


def check_config(paths: list[str], models: bool = False) -> int:
    from entroflow.config import load_config

    failed = 0
    for path in paths:
        try:
            config = load_config(path)
            if models:
                check_local_models(config)
        except EntroflowError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"{path}: ok ({len(config['experiments'])} experiments, {len(config['runs'])} runs, "
            f"{len(config['datasets'])} datasets, {len(config['models'])} models)"
        )
    return 1 if failed else 0


def check_local_models(config: dict) -> None:
    """The model folders a config names (local entries), as the first rule loading them would."""
    from entroflow.lm.model_folder import check_model_folder
    from entroflow.lm.models import load_tokenizer

    for name, entry in config["models"].items():
        if entry["source"] == "local":
            check_model_folder(entry["path"])
            load_tokenizer(entry["path"])
            print(f"models.{name}: ok ({entry['path']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entroflow", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate workflow config files")
    check.add_argument("paths", nargs="+", metavar="FILE")
    check.add_argument(
        "--models", action="store_true", help="also check local model folders (loads tokenizers)"
    )
    view = commands.add_parser("view", help="browse a trace directory or entropy file in a browser")
    view.add_argument("path", help="trace directory, run folder, or entropy .h5 file")
    view.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)"
    )
    view.add_argument("--port", type=int, default=8050, help="port (default: %(default)s)")
    view.add_argument("--debug", action="store_true", help="Dash debug mode (reloads on edits)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.paths, args.models)
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
