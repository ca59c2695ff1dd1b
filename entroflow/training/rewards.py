"""Rewards from answer correctness (math-verify) plus an optional format term.

Advantages and which groups carry gradient depend on the algorithm: training.algorithms.
"""

from __future__ import annotations

import re

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
