"""Which config made a shared intermediate, so two configs in one directory cannot silently
overwrite each other's work.

`resources/datasets/{name}.parquet` is named by the dataset's name alone. When another config
uses the same name for a different dataset, Snakemake would rebuild the file (its params changed)
and then redo every result of the first config that reads it. The rule that writes such a file
records beside it the config file(s) and the specification it was made from; at parse time a
config whose specification differs, and that is not the config that made it, is refused with one
line naming both. The config that made it may change its own specification (that reruns, as
Snakemake does for any changed param).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from entroflow.errors import EntroflowError


class SharedOutputError(EntroflowError):
    pass


def record_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.made-by.json")


def write_record(output: str | os.PathLike, configs: list[str], spec: dict) -> None:
    """Record (atomically) that `output` was made from `spec` by the config files `configs`."""
    path = record_path(output)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"configs": configs, "spec": spec}, sort_keys=True, indent=1))
    os.replace(tmp, path)


def check_record(
    output: str | os.PathLike, key: str, configs: list[str], spec: dict, rename: str
) -> None:
    """Refuse a config (files `configs`) whose `spec` for `key` (e.g. `datasets.arithmetic`)
    differs from the one `output` was made from by another config."""
    path = record_path(output)
    if not (Path(output).exists() and path.exists()):
        return
    try:
        made = json.loads(path.read_text())
        theirs, their_spec = made["configs"], made["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable record protects nothing; the rule rewrites it
    spec = json.loads(json.dumps(spec))  # the record's JSON view of it (tuples -> lists)
    if spec == their_spec or theirs == configs:
        return
    differ = sorted(k for k in spec.keys() | their_spec.keys() if spec.get(k) != their_spec.get(k))
    raise SharedOutputError(
        f"config: {key}: {output} was made by {', '.join(theirs)} from another specification "
        f"(differs in {', '.join(differ)}); this config ({', '.join(configs)}) would overwrite "
        f"it and invalidate that config's results: {rename}"
    )
