"""A training run's settings: one `runs.{name}` config entry, free of torch and TRL.

Kept apart from `trainer.py` so that the workflow (which reads the field names to choose a rule's
params) parses without importing torch, transformers, TRL or PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSettings:
    """One `runs.{name}` config entry (see the schema for descriptions)."""

    algorithm: str = "dr_grpo"
    steps: int = 30
    save_every: int = 10
    group_size: int = 8
    prompts_per_step: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | list[str] = "all-linear"
    max_new_tokens: int = 96
    temperature: float = 1.0
    beta: float = 0.0
    format_reward: float = 0.0
    seed: int = 0
    trace_every: int = 1
    probe: bool = True
    maxent: dict = field(default_factory=dict)
