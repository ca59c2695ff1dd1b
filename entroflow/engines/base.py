"""The engine interface. Entropy is never taken from an engine: the scorer recomputes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ForkingTemperature:
    """Section 3's decoding experiment: a token whose entropy (under softmax(logits /
    base_temperature), full vocabulary) is above `threshold` is sampled at `t_high`, any other
    at `t_low`. The threshold is normally the P80 measured at base_temperature."""

    threshold: float
    t_high: float
    t_low: float
    base_temperature: float = 1.0

    def __post_init__(self):
        for name in ("t_high", "t_low", "base_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # not used when `forking` is set
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    seed: int = 0
    forking: ForkingTemperature | None = None
    # Also return each sampled position's full-vocabulary entropy under softmax(logits / T), T the
    # sampling temperature (forking: its base temperature), before top-p/top-k: the scorer's value.
    record_entropy: bool = False

    @property
    def entropy_temperature(self) -> float:
        return self.forking.base_temperature if self.forking is not None else self.temperature


@dataclass
class Generation:
    prompt_row: int  # row into the prompts given to `generate`
    sample_index: int
    token_ids: np.ndarray  # int32 [L], including the EOS token when finish_reason == "stop"
    finish_reason: str  # "stop" | "length"
    engine_logprob: np.ndarray  # float32 [L]; NaN where the engine reports none
    entropy: np.ndarray | None = None  # float32 [L] when SamplingParams.record_entropy


Progress = Callable[[int, int, float], None]  # (done prompts, total prompts, seconds)


def sample_jobs(n_prompts: int, samples_per_prompt: int) -> list[tuple[int, int]]:
    """(prompt row, sample index) of every sequence to generate, prompt by prompt."""
    return [(row, s) for row in range(n_prompts) for s in range(samples_per_prompt)]


class Engine(Protocol):
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Generation]: ...
