"""Which config made a shared intermediate, so two configs in one directory cannot silently
overwrite each other's work.

`resources/datasets/{name}.parquet`, `results/{experiment}/` and `results/runs/{run}/` are
named by the entry's name alone. When another config uses the same name for a different entry,
Snakemake would rebuild the file (its params changed) and then redo every result of the first
config that reads it. The rule that writes such a file
records beside it the config file(s) and the specification it was made from; at parse time a
config whose specification differs, and that is not the config that made it, is refused with one
line naming both. The config that made it may change its own specification (that reruns, as
Snakemake does for any changed param).

Keys that change no result and trigger no rerun (UNTRACKED: a run's `report_to`, see
config.schema.yaml) are left out of the comparison: two configs that differ only in them share the
output. A checkpoint stage's `logging` stays in: it is a param (README, "What reruns when"), so
another config's logging would rerun the stage, and this config's next run would rerun it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from entroflow.errors import EntroflowError


class SharedOutputError(EntroflowError):
    pass


# Per part of a spec, the keys that are no rerun trigger (no rule reads them as a param).
UNTRACKED = {"run": frozenset({"report_to"})}


def tracked(spec: dict) -> dict:
    """`spec` without its UNTRACKED keys (records written before they were left out hold them)."""
    return {
        part: {k: v for k, v in value.items() if k not in UNTRACKED[part]}
        if part in UNTRACKED and isinstance(value, dict)
        else value
        for part, value in spec.items()
    }


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
        theirs, their_spec = made["configs"], tracked(made["spec"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # an unreadable record protects nothing; the rule rewrites it
    spec = tracked(json.loads(json.dumps(spec)))  # the record's JSON view (tuples -> lists)
    if spec == their_spec or theirs == configs:
        return
    differ = sorted(k for k in spec.keys() | their_spec.keys() if spec.get(k) != their_spec.get(k))
    raise SharedOutputError(
        f"config: {key}: {output} was made by {', '.join(theirs)} from another specification "
        f"(differs in {', '.join(differ)}); this config ({', '.join(configs)}) would overwrite "
        f"it and invalidate that config's results: {rename}"
    )


def experiment_spec(config: dict, name: str) -> dict:
    """What an experiment's results depend on: its entry, its model's and its dataset's."""
    from entroflow.data.datasets import resolve_entry

    entry = {k: v for k, v in config["experiments"][name].items() if k != "default_target"}
    dataset = entry["dataset"]
    return {
        "experiment": entry,
        "model": config["models"][entry["model"]],
        "dataset": resolve_entry(dataset, config["datasets"][dataset]),
    }


def run_spec(config: dict, name: str) -> dict:
    """What a training run depends on: its entry (less its trackers) and its model's."""
    entry = config["runs"][name]
    return tracked({"run": entry, "model": config["models"][entry["model"]]})


def shared_outputs(config: dict):
    """(output, key, spec, what to do instead) of every named intermediate a config shares
    with other configs in the same directory."""
    from entroflow.data.datasets import resolve_entry

    rename = "give the {} another name in this config (or delete {} to remake it)"
    for name, entry in config["datasets"].items():
        out = f"resources/datasets/{name}.parquet"
        yield out, f"datasets.{name}", resolve_entry(name, entry), rename.format("dataset", out)
    for name in config["experiments"]:
        out = f"results/{name}/entropy.h5"
        spec = experiment_spec(config, name)
        yield out, f"experiments.{name}", spec, rename.format("experiment", f"results/{name}")
    for name, run in config["runs"].items():
        if run["checkpoints"] is None:  # trained here (an external run's folders are its own)
            out = f"results/runs/{name}/run.json"
            spec = run_spec(config, name)
            yield out, f"runs.{name}", spec, rename.format("run", f"results/runs/{name}")


def check_config_outputs(config: dict, configs: list[str]) -> None:
    for output, key, spec, rename in shared_outputs(config):
        check_record(output, key, configs, spec, rename)
