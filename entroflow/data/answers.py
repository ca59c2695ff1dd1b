"""Answer checking with math-verify: `verify(parse(gold), parse(answer))`, gold first."""

from __future__ import annotations

import logging

from math_verify import parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)


def _gold_expression(gold: str) -> str:
    """Reference answers are bare LaTeX ("2\\sqrt{3}"); math-verify parses LaTeX inside $...$."""
    gold = gold.strip()
    if "$" in gold or "\\boxed" in gold:
        return gold
    return f"${gold}$"


def is_correct(response: str, gold: str | None) -> int:
    """1 if the response's final answer equals the reference, 0 if not, -1 without a reference."""
    if gold is None or str(gold).strip() == "":
        return -1
    try:
        return int(bool(verify(parse(_gold_expression(str(gold))), parse(response))))
    except Exception:  # math-verify raises on pathological inputs (timeouts, sympy errors)
        return 0
