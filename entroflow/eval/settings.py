"""A run's evaluation settings (`runs.<name>.eval`), their defaults read from the config schema.

Light on purpose (no torch): the workflow's `common.smk` reads the datasets to plan one job per
checkpoint and dataset, and gives each job `job_params()` only, so that adding a dataset to the
list reruns none of the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from entroflow.config import eval_datasets, schema_defaults

_EVAL = schema_defaults("runs", "*", "eval")


@dataclass
class EvalSettings:
    """runs.<name>.eval in the config (see its schema for each key's meaning)."""

    datasets: list[str] = field(default_factory=list)  # eval.datasets, or [eval.dataset]
    samples_per_prompt: int = _EVAL["samples_per_prompt"]
    k: list[int] = field(default_factory=lambda: list(_EVAL["k"]))
    seeds: list[int] = field(default_factory=lambda: list(_EVAL["seeds"]))
    temperature: float = _EVAL["temperature"]
    max_new_tokens: int = _EVAL["max_new_tokens"]

    @classmethod
    def from_entry(cls, entry: dict) -> EvalSettings:
        """From a validated `eval` entry: `dataset: x` is the one-dataset form of `datasets`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"datasets"}
        return cls(datasets=eval_datasets(entry), **{k: v for k, v in entry.items() if k in names})

    def job_params(self) -> dict:
        """What one (checkpoint, dataset) job reads: everything but the list of datasets."""
        params = dataclasses.asdict(self)
        del params["datasets"]
        return params
