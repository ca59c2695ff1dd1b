"""Math evaluation of a checkpoint: n samples per prompt over seeds; Pass@1, unbiased Pass@k, Avg@k.

Per-prompt results are appended to a JSONL file and flushed as each prompt finishes, so a
preempted job rerun skips what is done. The file starts with a header of the settings; a file
written under other settings is not resumed (it would mix two evaluations).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd

from entroflow.data.answers import is_correct
from entroflow.engines import Engine, SamplingParams

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), needs n >= k."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def avg_at_k(correct: Sequence[int], k: int) -> float:
    """Mean accuracy of the first k samples."""
    return float(np.mean(correct[:k]))


def _read_progress(path: Path, header: dict) -> dict[tuple[int, str], dict]:
    """Finished (seed, prompt id) -> record, if the file was written under the same settings."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]) != {"header": header}:
            log.info("%s was written under other settings; starting over", path)
            return {}
    except json.JSONDecodeError:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            break
        done[(row["seed"], row["id"])] = row
    return done


def evaluate(
    engine: Engine,
    problems: pd.DataFrame,
    prompt_ids: Sequence[Sequence[int]],
    tokenizer,
    params: SamplingParams,
    seeds: Sequence[int],
    progress_path: str | os.PathLike,
    header: dict,
) -> pd.DataFrame:
    """One row per (seed, prompt): number of samples n and correct c. Resumes from progress_path."""
    path = Path(progress_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_progress(path, header)
    if not done:
        path.write_text(json.dumps({"header": header}) + "\n")
    with open(path, "a") as f:
        for seed in seeds:
            todo = [i for i, pid in enumerate(problems["id"]) if (seed, pid) not in done]
            log.info(
                "seed %d: %d prompts to evaluate, %d already done",
                seed,
                len(todo),
                len(problems) - len(todo),
            )
            for i in todo:
                gens = engine.generate(
                    [prompt_ids[i]],
                    SamplingParams(**{**params.__dict__, "seed": seed * 100_003 + i}),
                )
                texts = tokenizer.batch_decode(
                    [g.token_ids.tolist() for g in gens], skip_special_tokens=True
                )
                correct = [int(is_correct(t, problems["answer"].iloc[i]) == 1) for t in texts]
                row = {
                    "seed": seed,
                    "id": str(problems["id"].iloc[i]),
                    "n": len(correct),
                    "correct": correct,
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[(seed, row["id"])] = row
    return pd.DataFrame(done.values())


def per_seed_metrics(results: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    """One row per seed, columns pass@k and avg@k for each k: each averaged over the prompts."""
    rows = {}
    for seed, group in results.groupby("seed"):
        row = {}
        for k in ks:
            row[f"pass@{k}"] = float(
                np.mean([pass_at_k(r.n, sum(r.correct), k) for r in group.itertuples()])
            )
            row[f"avg@{k}"] = float(np.mean([avg_at_k(r.correct, k) for r in group.itertuples()]))
        rows[int(seed)] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def summarize(results: pd.DataFrame, ks: Sequence[int]) -> dict:
    """Pass@1, Pass@k (unbiased) and Avg@k, each averaged over prompts then over seeds."""
    out: dict = {k: float(v) for k, v in per_seed_metrics(results, ks).mean().items()}
    out["prompts"] = int(results["id"].nunique())
    out["seeds"] = int(results["seed"].nunique())
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append(
            "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
        )
    return "\n".join(lines) + "\n"
