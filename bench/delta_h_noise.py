"""Where the ΔH stage's noise comes from, read off a run's ΔH files (no model needed).

    python bench/delta_h_noise.py [--run-dir results/runs/demo]

Per checkpoint, from the stored per-token values and tangents of every E response: the
per-response first-order terms of ⟨∇H, v⟩ (pathwise Σ_t dH_t + score Σ_k (G_k - b_k) dlp_k with
position-mean baselines), their mean and standard deviation, the pathwise part's, the share of
the score terms' sum of squares carried by the largest 1% of tokens, the between-prompt variance
(where prompts have several responses) and the curvature R(η)/η² of the nonlinearity.
Writes bench/results/delta_h_noise.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.estimators import delta_h_stats as st


def decompose(path: Path) -> dict:
    result = DeltaHResult.read(path)
    e_batch = result.e_batch
    offsets = e_batch["responses/offsets"]
    tokens = {k: e_batch["tokens/" + k] for k in ("entropy", "logprob", "d_entropy", "d_logprob")}
    prompt = e_batch["responses/prompt_index"]
    eta, nonlinearity = result.estimates.eta, result.estimates.nonlinearity.value
    rows = {k: np.split(v.astype(np.float64), offsets[1:-1]) for k, v in tokens.items()}
    arrays = st.TokenArrays.from_lists(rows["entropy"], rows["logprob"])
    tangent = st.Tangent.from_lists(rows["d_entropy"], rows["d_logprob"], arrays.mask.shape[1])
    m = arrays.mask
    h = arrays.entropy * m
    g = np.cumsum(h[:, ::-1], 1)[:, ::-1] - h  # G_k = Σ_{t>k} H_t
    baseline = (g * m).sum(0) / np.maximum(m.sum(0), 1)
    score_terms = (g - baseline) * tangent.d_logprob * m  # (N, T)
    pathwise = tangent.d_entropy.sum(1)
    total = pathwise + score_terms.sum(1)
    squares = np.sort((score_terms**2).ravel())
    per_prompt = np.bincount(prompt)
    out = {
        "responses": len(total),
        "prompts": int((per_prompt > 0).sum()),
        "slope_mean": float(total.mean()),
        "slope_sd_per_response": float(total.std()),
        "pathwise_sd_per_response": float(pathwise.std()),
        "top_1pct_token_share_of_score_variance": float(
            squares[-max(len(squares) // 100, 1) :].sum() / squares.sum()
        ),
        "curvature_R_over_eta2": (nonlinearity / eta**2).tolist(),
    }
    k = per_prompt.max()
    if k > 1:  # one-way random effects: between = Var(prompt means) - within / k
        means = np.bincount(prompt, total) / np.maximum(per_prompt, 1)
        within = np.mean([total[prompt == p].var(ddof=1) for p in np.flatnonzero(per_prompt)])
        out["between_prompt_variance"] = float(means[per_prompt > 0].var() - within / k)
        out["total_variance"] = float(total.var())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="results/runs/demo")
    args = parser.parse_args()
    files = sorted(Path(args.run_dir, "delta_h").glob("checkpoint-*.h5"))
    if not files:
        raise SystemExit(f"no ΔH files under {args.run_dir}/delta_h (run `make demo` first)")
    result = {f.stem: decompose(f) for f in files}
    for name, r in result.items():
        print(
            f"{name}: {r['responses']} responses, slope {r['slope_mean']:+.2f} per unit η, "
            f"sd {r['slope_sd_per_response']:.1f} per response (pathwise {r['pathwise_sd_per_response']:.1f}), "
            f"top 1% of tokens {r['top_1pct_token_share_of_score_variance']:.1%} of the score part; "
            f"between-prompt variance {r.get('between_prompt_variance', float('nan')):.0f} "
            f"of {r.get('total_variance', float('nan')):.0f}"
        )
    out = Path("bench/results/delta_h_noise.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
