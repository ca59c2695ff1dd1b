"""Section 3's per-class temperature experiment: the grid of (T_high, T_low) cells and its table."""

from __future__ import annotations

import pandas as pd


def cell_name(t_high: float, t_low: float) -> str:
    """File stem of one cell, e.g. th1.5_tl0.5 (the rule's wildcards)."""
    return f"th{t_high:g}_tl{t_low:g}"


def sweep_cells(sweep: dict) -> list[tuple[float, float]]:
    return [(float(h), float(lo)) for h in sweep["t_high"] for lo in sweep["t_low"]]


def sweep_table(cells: list[dict]) -> pd.DataFrame:
    """One row per cell, sorted by T_high then T_low; metric columns as the cells report them."""
    frame = pd.DataFrame(cells).sort_values(["t_high", "t_low"], kind="stable")
    first = ["t_high", "t_low", "threshold"]
    return frame[first + [c for c in frame.columns if c not in first]].reset_index(drop=True)


def metric_grid(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """T_high rows x T_low columns of one metric (for the heat-map)."""
    return table.pivot(index="t_high", columns="t_low", values=metric).sort_index(ascending=False)
