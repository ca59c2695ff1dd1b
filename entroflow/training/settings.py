"""A training run's settings: one `runs.{name}` config entry, free of torch and TRL.

Kept apart from `trainer.py` so that the workflow (which reads the field names to choose a rule's
params) parses without importing torch, transformers, TRL or PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from entroflow.config import schema_defaults

_RUN = schema_defaults("runs", "*")
_LORA = schema_defaults("runs", "*", "lora")


@dataclass
class RunSettings:
    """One `runs.{name}` config entry (see the schema for descriptions and the defaults)."""

    algorithm: str = _RUN["algorithm"]
    steps: int = _RUN["steps"]
    save_every: int = _RUN["save_every"]
    group_size: int = _RUN["group_size"]
    prompts_per_step: int = _RUN["prompts_per_step"]
    learning_rate: float = _RUN["learning_rate"]
    weight_decay: float = _RUN["weight_decay"]
    lora_rank: int = _LORA["rank"]  # runs.{name}.lora.rank
    lora_alpha: float = _LORA["alpha"]
    lora_targets: str | list[str] = _LORA["targets"]
    lora_quantize: str | None = _LORA["quantize"]  # QLoRA: nf4 | fp4 base (bitsandbytes)
    lora_double_quant: bool = _LORA["double_quant"]
    max_new_tokens: int = _RUN["max_new_tokens"]
    temperature: float = _RUN["temperature"]
    beta: float = _RUN["beta"]
    format_reward: float = _RUN["format_reward"]
    seed: int = _RUN["seed"]
    trace_every: int = _RUN["trace_every"]
    probe: bool = _RUN["probe"]
    probe_every: int = _RUN["probe_every"]
    probe_sequences: int = _RUN["probe_sequences"]
    maxent: dict = field(default_factory=lambda: dict(_RUN["maxent"]))
    infoseed: dict = field(default_factory=lambda: dict(_RUN["infoseed"]))
    processes: int = _RUN["processes"]  # > 1: accelerate launch (training.launch)
    deepspeed_config: str | None = _RUN["deepspeed_config"]
    report_to: list[str] = field(default_factory=lambda: list(_RUN["report_to"]))
    # runs.{name}.precision: dtype, entropy_dtype, tf32, matmul_precision (lm.precision)
    precision: dict = field(default_factory=lambda: dict(_RUN["precision"]))

    def __post_init__(self):  # partial entries: the schema's defaults for the rest
        self.precision = {**_RUN["precision"], **self.precision}
        self.infoseed = {**_RUN["infoseed"], **self.infoseed}
