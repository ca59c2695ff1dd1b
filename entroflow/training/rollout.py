"""One training step's rollouts in plain Python/numpy, made once by the trainer from TRL's batch.

`EntroflowGRPOTrainer` (training.trainer) builds a `Rollout` after TRL has generated, rewarded
and scored a batch: sequences unpadded once, rewards reduced once (weighted sum of the reward
functions), the advantages the loss will use. It hands the rollout to every callback that defines
`on_rollout(trainer, rollout)` (the entropy monitor does), so nothing else reads TRL's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Rollout:
    """One generation batch: what the MaxEnt weights, a trace file and the step probe need."""

    prompt_ids: list[list[int]]  # [B] unpadded prompt tokens
    completion_ids: list[list[int]]  # [B] unpadded completion tokens (EOS included)
    prompt_text: list[str]
    answers: list[str]
    rewards_per_func: np.ndarray  # float32 [B, n_funcs], NaN where a function abstains
    rewards: np.ndarray  # float32 [B]: Σ_k weight_k · reward_k, abstentions counted as 0
    correct: np.ndarray  # int8 [B]: the first reward function above 0.5
    advantages: np.ndarray  # float32 [B]: the advantages the loss uses
    group: np.ndarray  # int32 [B]: index of the prompt group
    # Values the trainer computed for this step (MaxEnt-GRPO: its controller's τ, β, Δτ, Δβ),
    # logged by it and written to the trace manifest under the same names:
    metrics: dict[str, float] = field(default_factory=dict)
    # InfoSeed-GRPO: int32 [B], each rollout's seed id (-1: the original prompt); prompt_ids
    # and prompt_text are then each rollout's own, seeded, prompt
    seed: np.ndarray | None = None


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]


def prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational
        return prompt[-1]["content"]
    return str(prompt)


def advantages_array(advantages: torch.Tensor) -> np.ndarray:
    """TRL's advantages as float32 [B] (a per-token tensor is averaged over its tokens)."""
    out = advantages.detach().float().cpu().numpy()
    if out.ndim > 1:
        out = out.mean(axis=1)
    return out.astype(np.float32)


def make_rollout(inputs, batch: dict, rewards_per_func: np.ndarray, weights, group_size: int):
    """The rollout of TRL's scored batch `batch` (from `_generate_and_score_completions`)."""
    per_func = np.nan_to_num(rewards_per_func, nan=0.0)
    rewards = (per_func * np.asarray(weights, dtype=np.float64)).sum(axis=1)
    n = len(inputs)
    return Rollout(
        prompt_ids=unpad(batch["prompt_ids"], batch["prompt_mask"]),
        completion_ids=unpad(batch["completion_ids"], batch["completion_mask"]),
        prompt_text=[prompt_text(x["prompt"]) for x in inputs],
        answers=[str(x.get("answer", "")) for x in inputs],
        rewards_per_func=np.asarray(rewards_per_func, dtype=np.float32),
        rewards=rewards.astype(np.float32),
        correct=(per_func[:, 0] > 0.5).astype(np.int8),
        advantages=advantages_array(batch["advantages"]),
        group=(np.arange(n) // max(group_size, 1)).astype(np.int32),
    )
