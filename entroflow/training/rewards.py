"""Rewards from answer correctness (math-verify) plus an optional format term, and advantages."""

from __future__ import annotations

import re

import numpy as np

from entroflow.data.answers import is_correct

BOXED = re.compile(r"\\boxed\{[^{}]*\}")


def completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def correctness_rewards(completions, answers) -> list[float]:
    """1.0 if the final answer math-verifies against the reference, else 0.0."""
    return [
        float(is_correct(completion_text(c), a) == 1)
        for c, a in zip(completions, answers, strict=True)
    ]


def format_rewards(completions) -> list[float]:
    """1.0 when the completion ends its reasoning with exactly one \\boxed{...} answer."""
    return [float(len(BOXED.findall(completion_text(c))) == 1) for c in completions]


def make_reward_funcs(format_weight: float = 0.0) -> tuple[list, list[float]]:
    """TRL reward functions and their weights: correctness (1.0) and, if weighted, format."""

    def correctness(prompts, completions, answer, **kwargs):
        return correctness_rewards(completions, answer)

    def answer_format(prompts, completions, **kwargs):
        return format_rewards(completions)

    if format_weight:
        return [correctness, answer_format], [1.0, float(format_weight)]
    return [correctness], [1.0]


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
