"""Per-step entropy traces: steps/step_{step:06d}.h5 (contract layout), manifest.jsonl, summary.json.

A step file is written atomically before its manifest line is appended, so the manifest never
lists a half-written file. On resume, lines and files after the resumed step are dropped first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from entroflow.io import TokenTable, write_token_file

QUANTILES = (50, 80, 90, 99)
# The step probe (training.monitor), under these names in the trainer's logs, the manifest,
# summary.json and the training figure alike:
PROBE_PREDICTED = "probe_predicted"  # ⟨∇H̄, Δθ⟩: first-order change of the rollouts' mean entropy
PROBE_REALISED = "probe_realised"  # H̄(θ + Δθ) - H̄(θ) on the same tokens
PROBE_COVARIANCE = "probe_covariance"  # Cui et al.'s -κ Cov(log π, A)


# The step's token-entropy statistics (step_stats) also go to the trainer's logs, hence to the
# experiment trackers (runs.*.report_to), under these names:
LOGGED_STATS = ("mean", "p50", "p80", "p90", "p99")


def logged_stats(stats: dict) -> dict:
    """step_stats' values under their names in the trainer's logs: trace_entropy/p50, ..."""
    return {f"trace_entropy/{k}": stats[k] for k in LOGGED_STATS if k in stats}


def step_stats(entropy: np.ndarray) -> dict:
    h = np.asarray(entropy, dtype=np.float64)
    if h.size == 0:
        return {"tokens": 0}
    return {
        "tokens": int(h.size),
        "mean": float(h.mean()),
        "std": float(h.std()),
        "min": float(h.min()),
        "max": float(h.max()),
        **{f"p{q}": float(np.percentile(h, q)) for q in QUANTILES},
        "frac_below_0.01": float((h < 0.01).mean()),
    }


class TraceWriter:
    def __init__(self, trace_dir: str | os.PathLike):
        self.dir = Path(trace_dir)
        self.steps_dir = self.dir / "steps"
        self.manifest = self.dir / "manifest.jsonl"
        self.steps_dir.mkdir(parents=True, exist_ok=True)

    def step_path(self, step: int) -> Path:
        return self.steps_dir / f"step_{step:06d}.h5"

    def read_manifest(self) -> list[dict]:
        if not self.manifest.exists():
            return []
        rows = []
        for line in self.manifest.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: drop it and everything after
                break
        return rows

    def truncate_after(self, step: int) -> None:
        """Keep steps <= `step` (the checkpoint a run resumes from); remove later lines and files."""
        kept = [row for row in self.read_manifest() if row["step"] <= step]
        self._rewrite(kept)
        for path in self.steps_dir.glob("step_*.h5"):
            if int(path.stem.split("_")[1]) > step:
                path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.manifest.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.manifest)

    def write(self, step: int, table: TokenTable, extra: dict) -> dict:
        path = self.step_path(step)
        write_token_file(path, table)
        row = {
            "step": step,
            "file": str(path.relative_to(self.dir)),
            "responses": table.n_responses,
            **step_stats(table["tokens/entropy"]),
            **extra,
        }
        with open(self.manifest, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row

    def write_summary(self, attrs: dict | None = None) -> dict:
        rows = self.read_manifest()
        summary = {"steps": [r["step"] for r in rows], **(attrs or {})}
        if rows:
            for key in (
                "mean",
                "p80",
                "reward_mean",
                PROBE_PREDICTED,
                PROBE_REALISED,
                PROBE_COVARIANCE,
            ):
                values = [r.get(key) for r in rows]
                present = [v for v in values if v is not None]
                # The probe's keys may skip steps (probe_every): null there, aligned with "steps".
                if len(present) == len(values) or (present and key.startswith("probe_")):
                    summary[key] = {"first": present[0], "last": present[-1], "all": values}
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.dir / "summary.json")
        return summary
