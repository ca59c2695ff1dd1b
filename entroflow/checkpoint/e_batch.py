"""The ΔH stage's E-batch as it grows: per-token values at θ and exact tangents along the update."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from entroflow.checkpoint.replay import batch_table
from entroflow.estimators import delta_h_stats as st
from entroflow.estimators.adam import AdamStep
from entroflow.io import TokenTable, flatten
from entroflow.lm.tangents import ScoresWithTangent, score_with_tangent


def timed(clock: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    clock.setdefault(key, []).append(time.perf_counter() - t0)
    return out


@dataclass
class EBatch:
    """The E-batch as it grows: sequences in draw order, per-token values at θ and tangents
    along v and along its gradient part (float64 numpy, one array per sequence)."""

    gens: list = field(default_factory=list)
    columns: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {
            k: []
            for k in ("entropy", "logprob", "d_entropy", "d_logprob", "d_entropy_g", "d_logprob_g")
        }
    )

    def add(self, gens, total: ScoresWithTangent, gradient_part: ScoresWithTangent, values=None):
        """`values` (a plain forward's SequenceScores) replaces the JVP's primal values."""
        self.gens += gens
        c = self.columns
        if values is None:
            c["entropy"] += total.entropy
            c["logprob"] += total.logprob
        else:
            c["entropy"] += [e.detach().double().cpu().numpy() for e in values.entropy]
            c["logprob"] += [lp.detach().double().cpu().numpy() for lp in values.logprob]
        c["d_entropy"] += total.d_entropy
        c["d_logprob"] += total.d_logprob
        c["d_entropy_g"] += gradient_part.d_entropy
        c["d_logprob_g"] += gradient_part.d_logprob

    def arrays(self) -> st.TokenArrays:
        return st.TokenArrays.from_lists(self.columns["entropy"], self.columns["logprob"])

    def tangents(self, width: int) -> dict[str, st.Tangent]:
        c = self.columns
        total = st.Tangent.from_lists(c["d_entropy"], c["d_logprob"], width)
        grad = st.Tangent.from_lists(c["d_entropy_g"], c["d_logprob_g"], width)
        rest = st.Tangent(total.d_entropy - grad.d_entropy, total.d_logprob - grad.d_logprob)
        return {"total": total, "gradient_part": grad, "remainder": rest}

    @property
    def prompt_rows(self) -> np.ndarray:
        return np.array([g.prompt_row for g in self.gens])

    def table(self, problems, prompt_ids, e_rows, tokenizer) -> TokenTable:
        """The contract layout: responses sorted by (prompt, sample), token columns alike."""
        order = sorted(
            range(len(self.gens)),
            key=lambda i: (self.gens[i].prompt_row, self.gens[i].sample_index),
        )
        table = batch_table(
            problems, prompt_ids, e_rows, [self.gens[i] for i in order], tokenizer, {}
        )
        tokens = table.groups["tokens"]
        for key, dtype, name in (
            ("entropy", np.float32, "entropy"),
            ("logprob", np.float32, "logprob"),
            ("d_entropy", np.float64, "d_entropy"),
            ("d_logprob", np.float64, "d_logprob"),
            ("d_entropy_g", np.float64, "d_entropy_gradient_part"),
            ("d_logprob_g", np.float64, "d_logprob_gradient_part"),
        ):
            tokens[name], _ = flatten([self.columns[key][i] for i in order], dtype)
        return table


def tangents_along(clock: dict, score, model, step: AdamStep):
    """Exact tangents of one batch's scores along v and along its gradient part."""
    total = timed(clock, "jvp", lambda: score_with_tangent(score, model, step.direction))
    grad = timed(clock, "jvp", lambda: score_with_tangent(score, model, step.gradient_part))
    return total, grad
