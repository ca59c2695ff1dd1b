"""Settings of the checkpoint stages, their defaults read from the config schema (one source).

Light on purpose (no torch): the workflow's `common.smk` builds each rule's params with
`stage_params`, which keeps only the keys a stage uses, so changing another section of a run's
entry does not rerun it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from entroflow.config import schema_defaults

_DELTA_H = schema_defaults("runs", "*", "delta_h")
_FISHER = schema_defaults("runs", "*", "fisher")
_LOGGING = schema_defaults("runs", "*", "delta_h", "logging")  # the fisher section's are the same
LOG_LEVELS = ("minimal", "standard", "detailed", "debug")


@dataclass
class LoggingSettings:
    """runs.<name>.delta_h.logging and .fisher.logging: what a stage writes beside its rule log
    (checkpoint.detailed_log). A switch left None takes the level's default (on at debug)."""

    level: str = _LOGGING["level"]  # minimal | standard | detailed | debug
    log_sequences: bool | None = _LOGGING["log_sequences"]
    log_tokens: bool | None = _LOGGING["log_tokens"]
    log_raw_tensors: bool | None = _LOGGING["log_raw_tensors"]
    compress: bool = _LOGGING["compress"]
    max_files: int = _LOGGING["max_files"]

    def __post_init__(self):
        if self.level not in LOG_LEVELS:
            raise ValueError(f"logging.level: {self.level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.max_files < 1:
            raise ValueError(f"logging.max_files: {self.max_files} is less than 1")

    @property
    def detailed(self) -> bool:
        """Per-η, per-round and per-sequence records (levels detailed and debug)."""
        return self.level in ("detailed", "debug")

    def switch(self, name: str) -> bool:
        """log_sequences / log_tokens / log_raw_tensors: as set, else on at level debug only."""
        value = getattr(self, name)
        return self.level == "debug" if value is None else bool(value)


def _logging_field():
    return field(default_factory=LoggingSettings)


def _as_logging(value) -> LoggingSettings:
    return value if isinstance(value, LoggingSettings) else LoggingSettings(**(value or {}))


@dataclass
class DeltaHSettings:
    """runs.<name>.delta_h in the config (see its schema for each key's meaning)."""

    e_prompts: int = _DELTA_H["e_prompts"]
    e_samples_max: int = _DELTA_H["e_samples_max"]
    target_half_width: float = _DELTA_H["target_half_width"]
    u_prompts: int = _DELTA_H["u_prompts"]
    eta_scale: list[float] = field(default_factory=lambda: list(_DELTA_H["eta_scale"]))
    estimator: str = _DELTA_H["estimator"]  # rb | surprisal
    normalisation: str = _DELTA_H["normalisation"]  # sequence | token
    clip: float | None = _DELTA_H["clip"]
    bootstrap: int = _DELTA_H["bootstrap"]
    seed: int = _DELTA_H["seed"]
    logging: LoggingSettings = _logging_field()  # changes no number: see recorded_settings
    # dtype, entropy_dtype, tf32, matmul_precision (lm.precision; applied by the stage's script)
    precision: dict = field(default_factory=lambda: dict(_DELTA_H["precision"]))

    def __post_init__(self):  # a partial precision entry: the schema's defaults for the rest
        self.logging = _as_logging(self.logging)
        self.precision = {**_DELTA_H["precision"], **self.precision}

    @property
    def accum_dtype(self) -> str:  # the older key's name, read by the stage
        return self.precision["entropy_dtype"]


@dataclass
class FisherSettings:
    """runs.<name>.fisher in the config, plus the scorer's batch budget (not a config key)."""

    block: int = _FISHER["block"]  # parameter columns per block: peak ~ (N_E + N_U) x block x 4 B
    gradient_dtype: str = _FISHER["gradient_dtype"]  # float32 | float16 in the gradient store
    sketch: str = _FISHER["sketch"]  # factored | jl
    sketch_dim: int = _FISHER["sketch_dim"]  # jl: dimension k (0: no sketch of either kind)
    sketch_side: int = _FISHER["sketch_side"]  # factored: k of each projected layer side
    seed: int = _FISHER["seed"]
    e_responses: int = _FISHER["e_responses"]  # the E-batch's first draws, in order
    logging: LoggingSettings = _logging_field()  # changes no number: see recorded_settings
    precision: dict = field(default_factory=lambda: dict(_FISHER["precision"]))  # lm.precision
    max_tokens_per_batch: int = 4096

    def __post_init__(self):  # a partial precision entry: the schema's defaults for the rest
        self.logging = _as_logging(self.logging)
        self.precision = {**_FISHER["precision"], **self.precision}


@dataclass
class RunShape:
    """What the update replay needs to know about the training run (keys of runs.<name>)."""

    algorithm: str
    group_size: int
    max_new_tokens: int
    temperature: float
    format_reward: float
    maxent: dict = field(default_factory=dict)  # maxent_grpo: reward_temperature, floor
    maxent_state: dict = field(default_factory=dict)  # maxent_grpo: the checkpoint's τ, β


def _known(cls, entry: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in entry.items() if k in names}


def stage_params(run_entry: dict, stage: str) -> dict:
    """{"run": the RunShape keys, stage: the stage's settings} of a validated run entry
    (stage "delta_h" or "fisher"), as JSON-able rule params."""
    shape = _known(RunShape, run_entry)
    if run_entry["algorithm"] != "maxent_grpo":
        shape.pop("maxent", None)
    settings_class = {"delta_h": DeltaHSettings, "fisher": FisherSettings}[stage]
    return {"run": shape, stage: _known(settings_class, run_entry[stage])}


def recorded_settings(params: dict) -> dict:
    """The rule params a result file records: without the stages' `logging`, which changes no
    number, so a stage's file is the same at every logging level."""
    return {
        k: {n: v for n, v in section.items() if n != "logging"}
        if isinstance(section, dict)
        else section
        for k, section in params.items()
    }
