"""Config loading and validation: JSON schema (with defaults filled in) plus cross-references.

Every error is one `ConfigError` whose message names the key path, e.g.
`config: experiments.demo.shards: 'two' is not of type 'integer'`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import yaml

from entroflow.data.datasets import DatasetError, resolve_entry
from entroflow.errors import EntroflowError
from entroflow.lm.models import ModelError, check_model_path, check_quantize, gguf_file
from entroflow.lm.precision import Precision, PrecisionError

SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"  # ships in the package


class ConfigError(EntroflowError):
    pass


# Entry names become path components (results/{experiment}/, resources/datasets/{dataset}.parquet)
# and wildcard values: letters, digits, '_', '-', '.' (not first), so none can leave its folder.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
NAMED_SECTIONS = ("datasets", "models", "experiments", "runs", "temperature_sweeps")


def check_names(config: dict) -> None:
    """One ConfigError naming the first entry whose name is not a safe path component."""
    for section in NAMED_SECTIONS:
        entries = config.get(section)
        for name in entries if isinstance(entries, dict) else ():
            if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
                raise ConfigError(
                    f"config: {section}: bad name {name!r}: names become folders and file names, "
                    "so use letters, digits, '_', '-' and '.' (not first), at most 100 characters"
                )


def check_removed_keys(config: dict) -> None:
    """One ConfigError naming a key an earlier entroflow took, with what replaced it, or a
    run's `infoseed` settings under another algorithm (checked before defaults are filled)."""
    runs = config.get("runs")
    for name, run in runs.items() if isinstance(runs, dict) else ():
        maxent = run.get("maxent") if isinstance(run, dict) else None
        controller = maxent.get("controller") if isinstance(maxent, dict) else None
        if isinstance(controller, dict) and "rate" in controller:
            raise ConfigError(
                f"config: runs.{name}.maxent.controller.rate: removed with the multiplicative "
                "controller; use mode (analytic, first_order or static) and meta_lr"
            )
        algorithm = run.get("algorithm") if isinstance(run, dict) else None
        infoseed = run.get("infoseed") if isinstance(run, dict) else None
        given = algorithm != "infoseed_grpo" and infoseed not in (None, {})
        # (a validated config holds the defaults: validating it again is not a user's mistake)
        if given and infoseed != schema_defaults("runs", "*", "infoseed"):
            raise ConfigError(
                f"config: runs.{name}.infoseed: settings of algorithm infoseed_grpo, but this "
                f"run's algorithm is {algorithm or 'the default'}; set algorithm: infoseed_grpo "
                "or remove them"
            )


# Older keys still read, each as its new place (a stage's `precision` entry).
ALIASES = {("delta_h", "accum_dtype"): "entropy_dtype", ("delta_h", "tf32"): "tf32"}


def read_aliases(config: dict) -> None:
    """Move each older key (runs.<run>.delta_h.accum_dtype, .tf32) to its place under the
    stage's `precision`, in place; one ConfigError if both spellings are given and differ."""
    runs = config.get("runs")
    for name, run in runs.items() if isinstance(runs, dict) else ():
        for (stage, old), new in ALIASES.items():
            entry = run.get(stage) if isinstance(run, dict) else None
            if not isinstance(entry, dict) or old not in entry:
                continue
            precision = entry.setdefault("precision", {})
            if not isinstance(precision, dict):
                continue  # the schema names it
            value = entry.pop(old)
            if new in precision and precision[new] != value:
                raise ConfigError(
                    f"config: runs.{name}.{stage}.{old}: {value!r} contradicts "
                    f"{stage}.precision.{new} ({precision[new]!r}); {old} is its older name, "
                    "give one"
                )
            precision[new] = value


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def schema_defaults(*path: str) -> dict:
    """The schema's defaults of one section's keys, e.g. `schema_defaults("runs", "*", "delta_h")`
    ("*" steps into a named entry): the one source of a stage's settings defaults."""
    node = load_schema()
    for key in path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    return {k: sub["default"] for k, sub in node["properties"].items() if "default" in sub}


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate in place (defaults filled) and check names refer to existing entries."""
    schema = schema or load_schema()
    check_names(config)
    check_removed_keys(config)
    read_aliases(config)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"config: {_path(err)}: {err.message}{more}")
    for key in ("datasets", "models"):
        if key not in config:
            raise ConfigError(f"config: missing section '{key}'")
    if not config["experiments"] and not config["runs"]:
        raise ConfigError("config: nothing to do: add an entry under 'experiments' or 'runs'")
    for name, entry in config["datasets"].items():
        try:
            resolve_entry(name, entry)
        except DatasetError as err:
            raise ConfigError(f"config: datasets.{name}: {err}") from err
    for name, entry in config["models"].items():
        if entry["source"] == "gguf":
            try:
                gguf_file(name, entry)
            except ModelError as err:
                raise ConfigError(f"config: models.{name}: {err}") from err
        elif entry.get("package") or entry.get("gguf_file"):
            raise ConfigError(f"config: models.{name}: 'package'/'gguf_file' need source 'gguf'")
        if entry["source"] in ("hub", "local"):
            if "path" not in entry:
                raise ConfigError(
                    f"config: models.{name}: source '{entry['source']}' needs a 'path'"
                )
            if entry["source"] == "local" and not Path(entry["path"]).expanduser().is_dir():
                raise ConfigError(
                    f"config: models.{name}: local model folder not found: {entry['path']}"
                )
            try:
                check_model_path(name, entry["path"])
            except ModelError as err:
                raise ConfigError(f"config: models.{name}: {err}") from err
    for name, exp in config["experiments"].items():
        for kind in ("model", "dataset"):
            section = config[kind + "s"]
            if exp[kind] not in section:
                raise ConfigError(
                    f"config: experiments.{name}.{kind}: unknown {kind} '{exp[kind]}'; "
                    f"available: {', '.join(sorted(section))}"
                )
    for name, run in config.get("runs", {}).items():
        _check_run(config, name, run)
    for name, sweep in config.get("temperature_sweeps", {}).items():
        _check_sweep(config, name, sweep)
    return config


def _check_sweep(config: dict, name: str, sweep: dict) -> None:
    where = f"config: temperature_sweeps.{name}"
    if sweep["experiment"] not in config["experiments"]:
        raise ConfigError(
            f"{where}.experiment: unknown experiment '{sweep['experiment']}'; "
            f"available: {', '.join(sorted(config['experiments'])) or '(none)'}"
        )
    if sweep["dataset"] is not None and sweep["dataset"] not in config["datasets"]:
        raise ConfigError(
            f"{where}.dataset: unknown dataset '{sweep['dataset']}'; available: {', '.join(sorted(config['datasets']))}"
        )
    too_big = [k for k in sweep["k"] if k > sweep["samples_per_prompt"]]
    if too_big:
        raise ConfigError(
            f"{where}.k: {too_big} exceed samples_per_prompt ({sweep['samples_per_prompt']})"
        )


def eval_datasets(entry: dict) -> list[str]:
    """The datasets a validated run's `eval` entry evaluates on: `datasets`, or `[dataset]`."""
    if entry.get("datasets") is not None:
        return list(entry["datasets"])
    return [entry["dataset"]] if entry.get("dataset") is not None else []


def _check_run(config: dict, name: str, run: dict) -> None:
    where = f"config: runs.{name}"
    if run["model"] not in config["models"]:
        raise ConfigError(
            f"{where}.model: unknown model '{run['model']}'; available: {', '.join(sorted(config['models']))}"
        )
    ev = run["eval"]
    if ev["dataset"] is not None and ev["datasets"] is not None:
        raise ConfigError(f"{where}.eval: give 'dataset' (one) or 'datasets' (a list), not both")
    datasets = [
        ("dataset", run.get("dataset")),
        ("eval.dataset", ev["dataset"]),
        *((f"eval.datasets.{i}", value) for i, value in enumerate(ev["datasets"] or [])),
        ("delta_h.dataset", run["delta_h"]["dataset"]),
    ]
    if run["checkpoints"] is None and run.get("dataset") is None:
        raise ConfigError(
            f"{where}: give a training 'dataset', or 'checkpoints' (a glob) for an external run"
        )
    for key, value in datasets:
        if value is not None and value not in config["datasets"]:
            raise ConfigError(
                f"{where}.{key}: unknown dataset '{value}'; available: {', '.join(sorted(config['datasets']))}"
            )
    if run["delta_h"]["enabled"] and not (run["delta_h"]["dataset"] or run.get("dataset")):
        raise ConfigError(
            f"{where}.delta_h.dataset: needed for an external run (no training dataset)"
        )
    if run["algorithm"] == "infoseed_grpo" and run["delta_h"]["enabled"]:
        raise ConfigError(
            f"{where}.delta_h: not available for algorithm infoseed_grpo: its update adds the "
            "seed loss and entropy term, which the ΔH replay and the Fisher kernel do not model "
            "(set delta_h.enabled: false; evaluation works on its checkpoints)"
        )
    seed_head = run["algorithm"] == "infoseed_grpo" and run["infoseed"]["loss"] == "ce"
    if seed_head and run["deepspeed_config"] is not None:
        raise ConfigError(
            f"{where}.deepspeed_config: not with infoseed_grpo's seed head (infoseed.loss: "
            "ce), which trains outside the DeepSpeed engine; use loss infonce or plain DDP"
        )
    if run["fisher"]["enabled"] and not run["delta_h"]["enabled"]:
        raise ConfigError(f"{where}.fisher: needs delta_h enabled (the kernel uses its batches)")
    if run["steps"] % run["save_every"]:
        raise ConfigError(
            f"{where}: steps ({run['steps']}) must be a multiple of save_every ({run['save_every']})"
        )
    ds = run["deepspeed_config"]
    if ds is not None and not Path(ds).expanduser().is_file():
        raise ConfigError(f"{where}.deepspeed_config: file not found: {ds}")
    try:
        check_quantize(run["lora"]["quantize"])
    except ModelError as err:
        raise ConfigError(f"{where}.lora.quantize: {err}") from None
    if run["lora"]["quantize"] is not None and run["probe"] and run["probe_sequences"] > 0:
        raise ConfigError(
            f"{where}.probe_sequences: a sampled probe takes forward-mode tangents, which "
            "bitsandbytes' 4-bit layers (lora.quantize) do not support; use 0 (all rollouts)"
        )
    for key, entry in (
        ("precision", run["precision"]),
        ("delta_h.precision", run["delta_h"]["precision"]),
        ("fisher.precision", run["fisher"]["precision"]),
    ):
        try:
            Precision.of(entry, f"{where}.{key}")
        except PrecisionError as err:
            raise ConfigError(str(err)) from None
    too_big = [k for k in run["eval"]["k"] if k > run["eval"]["samples_per_prompt"]]
    if too_big:
        raise ConfigError(
            f"{where}.eval.k: {too_big} exceed samples_per_prompt ({run['eval']['samples_per_prompt']})"
        )


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_config(config)
