"""One page of an experiment's headline numbers, read back from the files earlier rules wrote.

The README quotes the demo's figures from `results/demo/summary.md`; `summary.json` holds the same
numbers for tests. Nothing is recomputed here: every figure is read from an existing output,

    stats.json            tokens, fraction below 0.01 / 0.1 nats, P50, P80 (forking threshold),
                          sampled accuracy
    top_tokens.csv        the most frequent forking (> P80) and low-entropy tokens
    training_report.json  the demo model's greedy accuracy on held-out problems (demo models only)
    trace/manifest.jsonl  a training run's reward per step: mean of the first and last k steps
    eval/table.csv        Pass@k / Avg@k per checkpoint and dataset (mean, SE over seeds)
    delta_h/*.h5          per checkpoint, at η = lr: ΔH, δH₁, covariance predictor, nonlinearity
                          with 95% intervals, and the verdict (checkpoint.delta_h_result)
    fisher/*/kernel.h5    per checkpoint: the kernel's reconstruction-identity relative error
                          (checkpoint.fisher_run.FisherResult)

`summarize()` returns a plain dict; `markdown()` renders it; `write()` writes both files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.fisher_run import FisherResult
from entroflow.eval.table import read_wide

# Reasoning connectives of the arithmetic corpus (its opener, check and conclusion forks).
CONNECTIVES = ("Wait", "So", "Thus", "Therefore", "Hence", "Let", "We", "First")


@dataclass
class RunFiles:
    """A training run's outputs the summary reads (any of them may be absent)."""

    name: str
    manifest: Path | None = None  # trace/manifest.jsonl
    eval_table: Path | None = None  # eval/table.csv (entroflow.eval.table)
    delta_h: dict[int, Path] = field(default_factory=dict)  # step -> delta_h/checkpoint-*.h5
    fisher: dict[int, Path] = field(default_factory=dict)  # step -> fisher/checkpoint-*/kernel.h5


def model_summary(report: dict) -> dict:
    """The demo model's training report (`training_report.json`), the fields the README uses."""
    cfg = report.get("config", {})
    return {
        "parameters": report["parameters"],
        "vocab_size": report["vocab_size"],
        "steps": cfg.get("steps"),
        "final_loss": report["final_loss"],
        "greedy_accuracy": report["greedy_accuracy"],
        "eval_problems": report.get("eval_problems", cfg.get("eval_problems")),
    }


def entropy_summary(stats: dict, top: pd.DataFrame, n_tokens: int = 10) -> dict:
    """Headline figures of stats.json and the first `n_tokens` tokens of each class."""

    def tokens(cls: str) -> list[dict]:
        rows = top[top["class"] == cls].sort_values("rank").head(n_tokens)
        return [
            {"token": str(r.token), "count": int(r.count), "mean_entropy": float(r.mean_entropy)}
            for r in rows.itertuples()
        ]

    high = top[top["class"] == "high"]["token"].astype(str).tolist()
    return {
        "n_tokens": stats["n_tokens"],
        "n_responses": stats["n_responses"],
        "n_prompts": stats["n_prompts"],
        "temperature": stats.get("temperature"),
        "fraction_below_0.01": stats["fraction_below"]["0.01"],
        "fraction_below_0.1": stats["fraction_below"]["0.1"],
        "p50": stats["percentiles"]["P50"],
        "forking_percentile": stats["forking_percentile"],
        "forking_threshold": stats["forking_threshold"],
        "sampled_accuracy": stats["accuracy"],
        "connectives_in_top_forking_tokens": [c for c in CONNECTIVES if c in high[:30]],
        "forking_tokens": tokens("high"),
        "low_entropy_tokens": tokens("low"),
    }


def reward_summary(rows: list[dict], k: int) -> dict:
    """Mean reward of the first and the last k steps of a run's trace manifest."""
    reward = np.asarray([r["reward_mean"] for r in rows], dtype=np.float64)
    k = max(1, min(k, len(reward) // 2))
    return {
        "steps": len(rows),
        "k": k,
        "reward_first_steps": float(reward[:k].mean()),
        "reward_last_steps": float(reward[-k:].mean()),
    }


# summary.json key -> DeltaHResult.estimates field, each at η = lr with its 95% interval
INTERVALS = {
    "delta_h_true": "truth",
    "delta_h_first_order": "first_order",
    "delta_h_cov": "covariance",
    "nonlinearity": "nonlinearity",
}


def _bounds(lo: float, hi: float) -> list[float] | None:
    """Null where there are none: one U group for the covariance predictor, and Fieller's
    unbounded set for the relative error where ΔH's interval holds zero."""
    return [lo, hi] if np.isfinite([lo, hi]).all() else None


def delta_h_summary(path: str | Path) -> dict:
    """At η = lr of one checkpoint's ΔH result: the ground truth, δH₁, the covariance predictor
    and the nonlinearity, each with its 95% interval, δH₁'s relative error and the verdict."""
    result = DeltaHResult.read(path, batches=False)
    e, i = result.estimates, result.at_lr
    out = {"eta": float(e.eta[i]), "stderr": float(e.truth.stderr[i])}
    for key, name in INTERVALS.items():
        value, lo, hi = getattr(e, name).at(i)
        out[key], out[key + "_ci"] = value, _bounds(lo, hi)
    out["relative_error"] = float(e.relative_error[i])
    out["relative_error_ci"] = _bounds(*(float(x) for x in e.relative_error_ci[i]))
    out["verdict"] = result.verdict_at_lr
    out["e_responses"] = result.e_responses
    out["relative_half_width_at_lr"] = result.relative_half_width_at_lr
    return out


def fisher_summary(path: str | Path) -> dict:
    return {"identity_relative_error": FisherResult.read(path).identity_relative_error}


def eval_rows(table: pd.DataFrame) -> list[dict]:
    """One dict per (checkpoint, dataset) with a result: step, dataset, each metric's mean over
    seeds and its standard error (`<metric>_se`, None with one seed)."""
    rows = []
    for (step, dataset), part in table.dropna(subset=["mean"]).groupby(
        ["step", "dataset"], sort=False
    ):
        row: dict = {"step": int(step), "dataset": dataset}
        for r in part.itertuples():
            row[r.metric] = float(r.mean)
            row[f"{r.metric}_se"] = None if math.isnan(r.se) else float(r.se)
        rows.append(row)
    return sorted(rows, key=lambda row: row["step"])


def run_summary(files: RunFiles, k: int = 10) -> dict:
    out: dict = {"name": files.name}
    if files.manifest is not None:
        rows = [json.loads(x) for x in Path(files.manifest).read_text().splitlines() if x.strip()]
        out["reward"] = reward_summary(rows, k)
    if files.eval_table is not None:
        out["eval"] = eval_rows(read_wide(files.eval_table))
    steps = sorted(set(files.delta_h) | set(files.fisher))
    out["checkpoints"] = []
    for step in steps:
        entry: dict = {"step": step}
        if step in files.delta_h:
            entry.update(delta_h_summary(files.delta_h[step]))
        if step in files.fisher:
            entry.update(fisher_summary(files.fisher[step]))
        out["checkpoints"].append(entry)
    return out


def summarize(
    experiment: str,
    stats: dict,
    top: pd.DataFrame,
    model_report: dict | None = None,
    runs: list[RunFiles] = (),
    reward_steps: int = 10,
) -> dict:
    """The experiment's summary: model, entropy, and each run of its model."""
    return {
        "experiment": experiment,
        "model": model_summary(model_report) if model_report else None,
        "entropy": entropy_summary(stats, top),
        "runs": [run_summary(r, reward_steps) for r in runs],
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _g(x: float, digits: int = 3) -> str:
    """Significant digits, without scientific notation for ordinary magnitudes."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    if 1e-3 <= abs(x) < 1e4:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
        return f"{x:.{decimals}f}"
    return f"{x:.{digits - 1}e}"


def markdown(summary: dict) -> str:
    """summary.md: the figures the README quotes, one line each."""
    e = summary["entropy"]
    lines = [f"# Summary: experiment `{summary['experiment']}`", ""]
    m = summary["model"]
    if m:
        lines += [
            "## Demo model",
            "",
            f"- {m['parameters']:,} parameters, {m['vocab_size']}-token BPE, {m['steps']} steps,"
            f" final training loss {m['final_loss']:.4f}",
            f"- greedy accuracy on {m['eval_problems']} held-out problems:"
            f" {m['greedy_accuracy']:.3f}",
            "",
        ]
    lines += [
        "## Token entropy",
        "",
        f"- {e['n_tokens']:,} tokens in {e['n_responses']:,} responses to {e['n_prompts']}"
        f" prompts (T = {e['temperature']})",
        f"- below 0.01 nats: {_pct(e['fraction_below_0.01'])}; below 0.1 nats:"
        f" {_pct(e['fraction_below_0.1'])}",
        f"- P50 {e['p50']:.3f} nats; P{e['forking_percentile']:g} (forking threshold)"
        f" {e['forking_threshold']:.3f} nats",
        f"- sampled accuracy: {e['sampled_accuracy']:.3f}",
        "- connectives among the 30 most frequent forking tokens: "
        + (", ".join(f'"{c}"' for c in e["connectives_in_top_forking_tokens"]) or "none"),
        "- top forking tokens (count, mean entropy): "
        + ", ".join(
            f"`{t['token']}` ({t['count']}, {t['mean_entropy']:.2f})" for t in e["forking_tokens"]
        ),
        "- top low-entropy tokens: "
        + ", ".join(f"`{t['token']}`" for t in e["low_entropy_tokens"]),
    ]
    for run in summary["runs"]:
        lines += ["", f"## Run `{run['name']}`", ""]
        if "reward" in run:
            r = run["reward"]
            lines.append(
                f"- reward, mean of the first {r['k']} → last {r['k']} of {r['steps']} steps:"
                f" {r['reward_first_steps']:.3f} → {r['reward_last_steps']:.3f}"
            )
        for row in run.get("eval", []):
            scores = ", ".join(
                f"{key} {value:.3f}"
                + ("" if row[f"{key}_se"] is None else f" ± {row[f'{key}_se']:.3f}")
                for key, value in row.items()
                if key.startswith(("pass@", "avg@")) and not key.endswith("_se")
            )
            lines.append(f"- eval on {row['dataset']}, checkpoint {row['step']}: {scores}")
        if run["checkpoints"]:
            lines += checkpoint_table(run["checkpoints"])
    return "\n".join(lines) + "\n"


def checkpoint_table(checkpoints: list[dict]) -> list[str]:
    """The ΔH and Fisher figures of each checkpoint at η = lr, one Markdown row each."""
    names = list(INTERVALS)
    lines = [
        "",
        "At η = lr, 95% intervals, nats per sequence:",
        "",
        "| checkpoint | η = lr | E responses | ΔH ground truth | ΔH half-width (% of ΔH) |"
        " δH₁ | covariance predictor | nonlinearity | δH₁ relative error | verdict |"
        " Fisher identity error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checkpoints:
        half = c.get("relative_half_width_at_lr")
        cells = [str(c["step"]), _g(c["eta"]) if "eta" in c else "-"]
        cells.append(f"{c['e_responses']:,}" if "e_responses" in c else "-")
        cells.append(_with_interval(c, names[0]))
        cells.append(f"{100 * half:.0f}%" if half is not None else "-")
        cells += [_with_interval(c, name) for name in names[1:]]
        cells.append(_with_interval(c, "relative_error"))
        cells.append(c.get("verdict", "-"))
        error = c.get("identity_relative_error")
        cells.append(_g(error, 2) if error is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _with_interval(entry: dict, name: str) -> str:
    if name not in entry:
        return "-"
    if name + "_ci" not in entry:
        return _g(entry[name])
    if entry[name + "_ci"] is None:
        return f"{_g(entry[name])} ({'unbounded' if name == 'relative_error' else 'no interval'})"
    low, high = entry[name + "_ci"]
    return f"{_g(entry[name])} [{_g(low)}, {_g(high)}]"


def write(summary: dict, json_path: str | Path, md_path: str | Path) -> None:
    Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    Path(md_path).write_text(markdown(summary))
