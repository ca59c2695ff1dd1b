"""The training algorithms' conventions, defined once: the trainer (training.trainer), the ΔH
stage's update replay (checkpoint.delta_h_run) and the Fisher kernel (checkpoint.fisher_run) all
read them from here.

Per algorithm: TRL's `loss_type` and `scale_rewards`, how advantages are made, which groups carry
gradient, and the loss normalisation. At the sampling parameters (importance ratio 1, no KL term)
each algorithm's loss on B sequences is linear in their log-probabilities S(y_i) = Σ_t log π(y_it):

    L = -Σ_i c_i S(y_i)
    grpo, infoseed_grpo:   c_i = A_i / (B · L_i)              (TRL loss_type "grpo": token mean,
                                                               then sequence mean)
    dr_grpo, maxent_grpo:  c_i = A_i / (B · max_new_tokens)  (TRL loss_type "dr_grpo")

`rl_loss` is that loss (its gradient replays training's), `loss_coefficients` the c_i (the
Fisher kernel's row weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from entroflow.estimators.delta_h import SequenceScores


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss_type: str  # TRL GRPOConfig.loss_type
    advantages: str  # "group_std": (r - mean) / (std + 1e-4); "group_mean": r - mean;
    # "maxent": listwise A_i = G w_i - 1 (training.maxent), replacing TRL's
    per_length: bool  # loss normalisation: each sequence by its own length (else max_new_tokens)

    @property
    def scale_rewards(self) -> str:
        """TRL GRPOConfig.scale_rewards. MaxEnt replaces TRL's advantages, so its value (TRL's
        default "group") does not reach the loss."""
        return "none" if self.advantages == "group_mean" else "group"

    @property
    def listwise(self) -> bool:
        """Advantages from MaxEnt's listwise weights: every group moves, equal rewards or not."""
        return self.advantages == "maxent"

    def group_advantages(self, rewards: np.ndarray, group_size: int) -> np.ndarray:
        """TRL's group advantages (grpo: std-scaled; dr_grpo: not)."""
        if self.listwise:
            raise ValueError(f"{self.name}: advantages come from the MaxEnt weights")
        return group_advantages(rewards, group_size, scale=self.advantages == "group_std")

    def informative(self, rewards: np.ndarray, group_size: int) -> np.ndarray:
        """Per sequence: does it carry an RL gradient? Group advantages vanish on groups whose
        rewards are all equal; MaxEnt's listwise weights move every group."""
        if self.listwise:
            return np.ones(np.asarray(rewards).size, dtype=bool)
        return np.repeat(informative_groups(rewards, group_size), group_size)


ALGORITHMS = {
    a.name: a
    for a in (
        Algorithm("grpo", loss_type="grpo", advantages="group_std", per_length=True),
        Algorithm("dr_grpo", loss_type="dr_grpo", advantages="group_mean", per_length=False),
        Algorithm("maxent_grpo", loss_type="dr_grpo", advantages="maxent", per_length=False),
        # grpo's loss and advantages; the seed terms (training.infoseed) are added by its trainer
        Algorithm("infoseed_grpo", loss_type="grpo", advantages="group_std", per_length=True),
    )
}


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{name}'; available: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool = True) -> np.ndarray:
    """GRPO advantages: reward minus its group mean, divided by the group std (+1e-4) if `scale`.

    Dr.GRPO uses scale=False. `rewards` holds consecutive groups of `group_size`.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    adv = grouped - grouped.mean(axis=1, keepdims=True)
    if scale:
        adv = adv / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Mask of groups whose rewards are not all equal (the only ones that carry gradient)."""
    grouped = np.asarray(rewards).reshape(-1, group_size)
    return grouped.max(axis=1) > grouped.min(axis=1)


def loss_coefficients(
    advantages: np.ndarray, lengths: np.ndarray, name: str, max_new_tokens: int
) -> np.ndarray:
    """c_i with L = -Σ_i c_i S(y_i) (module docstring); `lengths` are the L_i (grpo only)."""
    advantages = np.asarray(advantages, dtype=np.float64)
    if algorithm(name).per_length:
        lengths = np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)
        return advantages / (len(advantages) * lengths)
    return advantages / (len(advantages) * max_new_tokens)


def rl_loss(
    scores: SequenceScores, advantages: np.ndarray, name: str, max_new_tokens: int
) -> torch.Tensor:
    """The run's policy-gradient loss at the sampling parameters (ratio = 1), TRL's normalisation.

    dr_grpo / maxent_grpo: -Σ_i A_i Σ_t log π(y_it) / (B · max_new_tokens)
    grpo:                  -mean_i (A_i Σ_t log π(y_it) / L_i)
    """
    b = len(scores.logprob)
    pairs = zip(advantages, scores.logprob, strict=True)
    if algorithm(name).per_length:
        return -sum(float(a) * lp.sum() / max(len(lp), 1) for a, lp in pairs) / b
    return -sum(float(a) * lp.sum() for a, lp in pairs) / (b * max_new_tokens)
