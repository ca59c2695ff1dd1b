"""The viewer's token view as plain functions (no web framework): filter, sort, colour, render."""

from __future__ import annotations

import html

import matplotlib
import numpy as np
import pandas as pd

from entroflow.report.plots import LOG_FLOOR, hex_colour, log_position

SORTS = {
    "position": ("position", True),
    "entropy-desc": ("entropy", False),
    "entropy-asc": ("entropy", True),
}


def in_range(entropy: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """Mask of tokens inside [low, high]; an unset bound does not filter (the default hides nothing)."""
    keep = np.ones(len(entropy), dtype=bool)
    if low is not None:
        keep &= entropy >= low
    if high is not None:
        keep &= entropy <= high
    return keep


def matches(tokens: pd.Series, search: str | None) -> np.ndarray:
    """Tokens whose decoded text contains `search` (case-insensitive); all False when empty."""
    if not search:
        return np.zeros(len(tokens), dtype=bool)
    return tokens.str.lower().str.contains(search.lower(), regex=False).to_numpy()


def token_view(
    tokens: pd.DataFrame,
    low: float | None = None,
    high: float | None = None,
    search: str | None = None,
    sort: str = "position",
) -> pd.DataFrame:
    """The rows of the token table (and of its CSV export): range filter, search, sort."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort '{sort}'; available: {', '.join(SORTS)}")
    keep = in_range(tokens["entropy"].to_numpy(), low, high)
    if search:
        keep &= matches(tokens["token"], search)
    column, ascending = SORTS[sort]
    view = tokens[keep].sort_values(column, ascending=ascending, kind="stable")
    return view.reset_index(drop=True)


def colour_values(entropy: np.ndarray, scale: str, step_entropy: np.ndarray) -> np.ndarray:
    """Position in [0, 1] on the colour map: log10 entropy, or the percentile within the step.

    Most tokens sit near zero, so a linear min-max scale would paint almost everything one colour.
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    if scale == "percentile":
        ranked = np.sort(np.asarray(step_entropy, dtype=np.float64))
        return np.searchsorted(ranked, entropy, side="right") / max(len(ranked), 1)
    if scale == "log":
        return log_position(entropy, float(np.max(step_entropy)) if len(step_entropy) else 1.0)
    raise ValueError(f"unknown colour scale '{scale}'; available: log, percentile")


def colours(values: np.ndarray) -> list[tuple[str, str]]:
    """(background, text colour) per value on a perceptual map (viridis), readable either way."""
    rgba = matplotlib.colormaps["viridis"](np.clip(values, 0, 1))
    light = 0.299 * rgba[:, 0] + 0.587 * rgba[:, 1] + 0.114 * rgba[:, 2] > 0.5
    return [
        (hex_colour(c), "black" if is_light else "white")
        for c, is_light in zip(rgba, light, strict=True)
    ]


STYLE = """
body{margin:0;padding:8px;font-family:ui-monospace,monospace;font-size:13px;line-height:1.9}
.t{white-space:pre-wrap;border-radius:2px;padding:1px 0}
.out{background:#eee!important;color:#bbb!important}
.hit{outline:2px solid #e4572e;outline-offset:0}
"""


def heatmap_html(
    tokens: pd.DataFrame,
    step_entropy: np.ndarray,
    scale: str = "log",
    low: float | None = None,
    high: float | None = None,
    search: str | None = None,
) -> str:
    """One response as a standalone HTML page: tokens in order, coloured by entropy, with a
    tooltip (position, token id, entropy); out-of-range tokens greyed, search hits outlined."""
    entropy = tokens["entropy"].to_numpy()
    keep = in_range(entropy, low, high)
    hits = matches(tokens["token"], search)
    spans = []
    palette = colours(colour_values(entropy, scale, step_entropy))
    for row, (bg, fg), kept, hit in zip(
        tokens.itertuples(index=False), palette, keep, hits, strict=True
    ):
        classes = "t" + ("" if kept else " out") + (" hit" if hit else "")
        tip = f"pos {row.position} · id {row.token_id} · H = {row.entropy:.4g} nats"
        text = html.escape(str(row.token)).replace("\n", "⏎\n")
        spans.append(
            f'<span class="{classes}" style="background:{bg};color:{fg}" title="{tip}" '
            f'data-pos="{row.position}">{text}</span>'
        )
    return (
        f'<!doctype html><meta charset="utf-8"><style>{STYLE}</style><body>{"".join(spans)}</body>'
    )


def legend(step_entropy: np.ndarray, scale: str) -> list[tuple[str, str, str]]:
    """(label, background, text colour) swatches for the colour scale."""
    if scale == "percentile":
        qs = [0, 25, 50, 80, 95, 100]
        values = np.percentile(step_entropy, qs) if len(step_entropy) else np.zeros(len(qs))
        labels = [f"P{q} {v:.3g}" for q, v in zip(qs, values, strict=True)]
        positions = np.array(qs) / 100
    else:
        top = float(np.max(step_entropy)) if len(step_entropy) else 1.0
        ticks = [t for t in (LOG_FLOOR, 1e-3, 1e-2, 1e-1, 1.0, 10.0) if t < top] + [top]
        labels = [f"{t:.3g}" for t in ticks]
        positions = colour_values(np.array(ticks), "log", step_entropy)
    return [(label, bg, fg) for label, (bg, fg) in zip(labels, colours(positions), strict=True)]
