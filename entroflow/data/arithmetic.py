"""Synthetic arithmetic chain-of-thought problems: the demo's dataset and training corpus.

Two-digit addition and subtraction solved digit by digit. Most of a solution is determined by
the problem (low entropy once learned); a few places are genuine choices, like connectives and an
optional check ("Wait, let me check ...") and whether the answer is boxed, which play the role
of the paper's forking tokens. The last one gives RL an easy preference to learn from a format
reward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPENERS = ["", "Let's go digit by digit. ", "We work column by column. ", "First, the ones. "]
CONCLUSIONS = ["So", "Thus", "Therefore", "Hence"]
CHECK_PROBABILITY = 0.3
BOXED_PROBABILITY = 0.5  # the answer's format is a fork too: "\boxed{72}" or a bare "72"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"


def sample_problem(rng: random.Random, low: int = 10, high: int = 99) -> Problem:
    a, b = rng.randint(low, high), rng.randint(low, high)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, b, op)


def _addition_steps(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    steps = f"Add the ones: {a % 10} + {b % 10} = {ones}."
    if carry:
        steps += f" Write {ones % 10}, carry 1."
        tens = f"{a // 10} + {b // 10} + 1"
    else:
        tens = f"{a // 10} + {b // 10}"
    return steps + f" Add the tens: {tens} = {a // 10 + b // 10 + carry}."


def _subtraction_steps(a: int, b: int) -> str:
    if a % 10 >= b % 10:
        steps = f"Subtract the ones: {a % 10} - {b % 10} = {a % 10 - b % 10}."
        tens = f"{a // 10} - {b // 10}"
        tens_value = a // 10 - b // 10
    else:
        steps = f"Subtract the ones: {a % 10} < {b % 10}, borrow: {a % 10 + 10} - {b % 10} = {a % 10 + 10 - b % 10}."
        tens = f"{a // 10} - 1 - {b // 10}"
        tens_value = a // 10 - 1 - b // 10
    return steps + f" Subtract the tens: {tens} = {tens_value}."


def solution(problem: Problem, rng: random.Random) -> str:
    """A chain of thought ending in the answer (boxed or not), with random stylistic choices."""
    a, b = problem.a, problem.b
    steps = _addition_steps(a, b) if problem.op == "+" else _subtraction_steps(a, b)
    text = rng.choice(OPENERS) + steps
    if rng.random() < CHECK_PROBABILITY:
        inverse = "-" if problem.op == "+" else "+"
        text += f" Wait, let me check: {problem.answer} {inverse} {b} = {a}. Yes."
    answer = (
        f"\\boxed{{{problem.answer}}}" if rng.random() < BOXED_PROBABILITY else str(problem.answer)
    )
    return text + f" {rng.choice(CONCLUSIONS)} the answer is {answer}."


def problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [sample_problem(rng) for _ in range(n)]


def dataset_records(n: int, seed: int) -> list[dict]:
    """Rows for the builtin `arithmetic` dataset: id, problem, answer."""
    return [
        {"id": f"arith-{seed}-{i}", "problem": p.question, "answer": str(p.answer)}
        for i, p in enumerate(problems(n, seed))
    ]
