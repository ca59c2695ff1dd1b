"""Section 3 of "Beyond the 80/20 Rule": the token-entropy distribution and its forking tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from entroflow.config import schema_defaults
from entroflow.io import TokenTable, token_texts

# The paper's Qwen3-8B numbers (arXiv 2506.01939, Section 3), printed next to ours.
PAPER_QWEN3_8B = {"fraction_below_0.01": "> 0.5", "P80": 0.672}
FRACTION_THRESHOLDS = (0.01, 0.1, 0.672)
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)
VISIBLE_WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥"}


_ANALYSIS = schema_defaults("analysis")


@dataclass
class AnalysisSettings:
    """The config's `analysis` section (the schema holds the defaults and descriptions)."""

    forking_percentile: float = _ANALYSIS["forking_percentile"]
    low_entropy_percentile: float = _ANALYSIS["low_entropy_percentile"]
    top_tokens: int = _ANALYSIS["top_tokens"]
    min_token_count: int = _ANALYSIS["min_token_count"]


def entropy_stats(table: TokenTable, settings: AnalysisSettings) -> dict:
    """Distribution summary of all generated tokens plus accuracy and length summaries."""
    h = table["tokens/entropy"].astype(np.float64)
    if len(h) == 0:
        raise ValueError("no generated tokens to analyse")
    correct = table["responses/correct"]
    graded = correct[correct >= 0]
    lengths = np.diff(table["responses/offsets"])
    reasons, counts = np.unique(table["responses/finish_reason"].astype(str), return_counts=True)
    return {
        "n_tokens": int(len(h)),
        "n_responses": int(table.n_responses),
        "n_prompts": int(table.n_prompts),
        "mean": float(h.mean()),
        "median": float(np.median(h)),
        "std": float(h.std()),
        "max": float(h.max()),
        "fraction_below": {f"{t:g}": float((h < t).mean()) for t in FRACTION_THRESHOLDS},
        "percentiles": {f"P{q}": float(np.percentile(h, q)) for q in PERCENTILES},
        "forking_percentile": settings.forking_percentile,
        "forking_threshold": float(np.percentile(h, settings.forking_percentile)),
        "low_entropy_threshold": float(np.percentile(h, settings.low_entropy_percentile)),
        "accuracy": float(graded.mean()) if len(graded) else None,
        "graded_responses": int(len(graded)),
        "mean_response_length": float(lengths.mean()) if len(lengths) else 0.0,
        "finish_reasons": {str(r): int(c) for r, c in zip(reasons, counts, strict=True)},
        "paper_qwen3_8b": PAPER_QWEN3_8B,
        "entropy_convention": table.attrs.get("entropy_convention", ""),
        "temperature": table.attrs.get("temperature"),
        "model": table.attrs.get("model"),
        "dataset": table.attrs.get("dataset"),
    }


def display_token(text: str) -> str:
    """Token text with whitespace made visible ('␣so', '⏎'), for tables and word clouds."""
    stripped = text.strip()
    if stripped:
        return stripped
    return "".join(VISIBLE_WHITESPACE.get(c, c) for c in text) or "∅"


def top_tokens(table: TokenTable, stats: dict, settings: AnalysisSettings) -> pd.DataFrame:
    """The most frequent tokens above the forking threshold and at/below the low threshold.

    Tokens are grouped by their visible text (" so" and "so" together), as the paper's clouds do.
    Columns: class, rank, token, count, mean_entropy, share_of_class, token_ids.
    """
    h = table["tokens/entropy"]
    texts = np.asarray([display_token(t) for t in token_texts(table, table["tokens/token_id"])])
    ids = table["tokens/token_id"]
    classes = {
        "high": h > stats["forking_threshold"],
        "low": h <= stats["low_entropy_threshold"],
    }
    frames = []
    for name, mask in classes.items():
        if not mask.any():
            continue
        frame = pd.DataFrame({"token": texts[mask], "entropy": h[mask], "token_id": ids[mask]})
        grouped = frame.groupby("token").agg(
            count=("entropy", "size"),
            mean_entropy=("entropy", "mean"),
            token_ids=("token_id", lambda s: " ".join(map(str, sorted(set(s.tolist()))))),
        )
        grouped = grouped[grouped["count"] >= settings.min_token_count]
        grouped = grouped.sort_values(["count", "mean_entropy"], ascending=[False, False])
        grouped = grouped.head(settings.top_tokens).reset_index()
        grouped["share_of_class"] = grouped["count"] / int(mask.sum())
        grouped.insert(0, "rank", np.arange(1, len(grouped) + 1))
        grouped.insert(0, "class", name)
        frames.append(grouped)
    columns = ["class", "rank", "token", "count", "mean_entropy", "share_of_class", "token_ids"]
    return (
        pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    )


def pick_trajectories(table: TokenTable, n: int) -> list[int]:
    """n responses spread evenly over the length ranking (deterministic, longest included)."""
    lengths = np.diff(table["responses/offsets"])
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 0]
    if len(order) <= n:
        return order.tolist()
    return order[np.linspace(0, len(order) - 1, n).round().astype(int)].tolist()
