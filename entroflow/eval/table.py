"""A run's evaluation across datasets: per metric, checkpoints x datasets, mean ± SE over seeds.

Each (checkpoint, dataset) job writes one JSON (`eval/{dataset}/checkpoint-{step}.json`) with the
metrics averaged over seeds and, per seed, each metric averaged over the prompts (`per_seed`).
Here a cell is the mean over seeds and its standard error, std(ddof=1) / sqrt(seeds): the
sampling noise of the evaluation for that fixed set of prompts (none with one seed). The table is

    long()      one row per (metric, step, dataset): mean, se, seeds, prompts
    wide()      the CSV: columns metric, step, then per dataset `<dataset>` (mean), `<dataset>_se`
    markdown()  one block per metric, rows = checkpoints, columns = datasets, "mean ± se"
    text()      the same blocks as plain fixed-width text, for the rule's log
    write()     table.csv (wide) and table.md, each written atomically

A (checkpoint, dataset) without a result is an empty cell (NaN in the CSV, "-" in the text).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from entroflow.io import write_text_atomic

_METRIC = re.compile(r"(pass|avg)@(\d+)")
_COLUMNS = ["metric", "step", "dataset", "mean", "se", "seeds", "prompts"]


def metric_order(metrics: Iterable[str]) -> list[str]:
    """pass@k for each k, then avg@k for each k, k ascending."""
    found = [m for m in set(metrics) if _METRIC.fullmatch(m)]
    return sorted(
        found, key=lambda m: (_METRIC.fullmatch(m)[1] != "pass", int(_METRIC.fullmatch(m)[2]))
    )


def seed_mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (NaN with fewer than two seeds)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def long(
    results: Iterable[dict],
    datasets: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (metric, step, dataset) of the results (each a checkpoint JSON with `step`,
    `dataset`, the metrics and `per_seed`); `datasets`/`steps` fix the columns and rows, and any
    of them without a result gets a row with NaN. A result without `per_seed` gives its mean
    and no error bar."""
    rows = []
    for r in results:
        per_seed = r.get("per_seed", {})
        for metric in metric_order(r):
            if metric in per_seed:
                mean, se = seed_mean_se(list(per_seed[metric].values()))
            else:
                mean, se = float(r[metric]), math.nan
            rows.append(
                (metric, int(r["step"]), r["dataset"], mean, se, r.get("seeds"), r.get("prompts"))
            )
    found = pd.DataFrame(rows, columns=_COLUMNS)
    datasets = list(datasets) if datasets is not None else list(dict.fromkeys(found["dataset"]))
    steps = sorted(steps) if steps is not None else sorted(set(found["step"]))
    grid = pd.MultiIndex.from_product(
        [metric_order(found["metric"]), steps, datasets], names=_COLUMNS[:3]
    )
    return found.set_index(_COLUMNS[:3]).reindex(grid).reset_index()


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """The CSV layout: metric, step, then `<dataset>`, `<dataset>_se` per dataset."""
    datasets = list(dict.fromkeys(table["dataset"]))
    out = table.pivot(index=["metric", "step"], columns="dataset", values=["mean", "se"])
    out = out.reindex(
        index=pd.MultiIndex.from_frame(table[["metric", "step"]].drop_duplicates()),
        columns=[(v, d) for d in datasets for v in ("mean", "se")],
    )
    out.columns = [d if v == "mean" else f"{d}_se" for v, d in out.columns]
    return out.reset_index()


def read_wide(path: str | os.PathLike) -> pd.DataFrame:
    """The CSV back as the long table (without seeds and prompts)."""
    frame = pd.read_csv(path)
    datasets = [c for c in frame.columns[2:] if not c.endswith("_se")]
    rows = [
        (r["metric"], int(r["step"]), d, r[d], r[f"{d}_se"])
        for r in frame.to_dict("records")
        for d in datasets
    ]
    return pd.DataFrame(rows, columns=_COLUMNS[:5])


def _cell(mean: float, se: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.3f}" if pd.isna(se) else f"{mean:.3f} ± {se:.3f}"


def _label(metric: str) -> str:
    kind, k = _METRIC.fullmatch(metric).groups()
    return f"{kind.capitalize()}@{k}"


def _blocks(table: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows of cells) per metric."""
    datasets = list(dict.fromkeys(table["dataset"]))
    sizes = table.dropna(subset=["prompts"]).groupby("dataset")["prompts"].max()
    header = ["checkpoint"]
    for d in datasets:
        n = int(sizes[d]) if d in sizes else None
        header.append(d if n is None else f"{d} ({n} prompt{'s' if n != 1 else ''})")
    counts = {int(n) for n in table["seeds"].dropna()}
    if counts == {1}:
        over = ", one seed (no error bar)"
    elif len(counts) == 1:
        over = f", mean ± standard error over {counts.pop()} seeds"
    else:
        over = ", mean ± standard error over seeds"
    blocks = []
    for metric in dict.fromkeys(table["metric"]):
        part = table[table["metric"] == metric]
        rows = []
        for step, by_step in part.groupby("step", sort=True):
            cells = by_step.set_index("dataset")
            rows.append(
                [str(step)] + [_cell(cells.at[d, "mean"], cells.at[d, "se"]) for d in datasets]
            )
        blocks.append((f"{_label(metric)}{over}", header, rows))
    return blocks


def markdown(table: pd.DataFrame) -> str:
    lines = []
    for title, header, rows in _blocks(table):
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def text(table: pd.DataFrame) -> str:
    """Plain fixed-width blocks, one per metric."""
    out = []
    for title, header, rows in _blocks(table):
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        out += [title, fmt.format(*header), "  ".join("-" * w for w in widths)]
        out += [fmt.format(*row) for row in rows]
        out.append("")
    return "\n".join(out)


def write(table: pd.DataFrame, csv: str | os.PathLike, md: str | os.PathLike) -> None:
    write_text_atomic(csv, wide(table).to_csv(index=False))
    write_text_atomic(md, markdown(table))
