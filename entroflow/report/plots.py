"""Figures for Section 3: histogram, word clouds, entropy by position, and an HTML token view."""

from __future__ import annotations

import html
import os
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from entroflow.io import TokenTable, token_texts  # noqa: E402
from entroflow.training.traces import (  # noqa: E402
    PROBE_COVARIANCE,
    PROBE_PREDICTED,
    PROBE_REALISED,
)

LOG_FLOOR = 1e-4  # entropies below this share the darkest colour in the token view


def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def entropy_histogram(entropy: np.ndarray, stats: dict, path, title: str = "") -> None:
    """Histogram with a log-scale count axis and the forking-threshold line (paper's Fig. 2a)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(float(entropy.max()), 1e-3)
    ax.hist(
        entropy, bins=np.linspace(0, top, 60), color="#4c72b0", edgecolor="white", linewidth=0.3
    )
    ax.set_yscale("log")
    thr, q = stats["forking_threshold"], stats["forking_percentile"]
    ax.axvline(thr, color="#c44e52", linestyle="--", label=f"P{q:g} = {thr:.3f} nats")
    below = stats["fraction_below"]["0.01"]
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(title or f"{stats['n_tokens']:,} tokens; {below:.1%} below 0.01 nats")
    ax.legend()
    _save(fig, path)


def word_cloud(top: pd.DataFrame, token_class: str, path, colormap: str) -> None:
    """Word cloud of one class's most frequent tokens, sized by count."""
    from wordcloud import WordCloud

    rows = top[top["class"] == token_class]
    freqs = dict(zip(rows["token"], rows["count"], strict=True))
    fig, ax = plt.subplots(figsize=(7, 4))
    if freqs:
        cloud = WordCloud(
            width=900,
            height=500,
            background_color="white",
            colormap=colormap,
            random_state=0,
            regexp=r"\S+",
            collocations=False,
        ).generate_from_frequencies(freqs)
        ax.imshow(cloud, interpolation="bilinear")
    else:
        ax.text(0.5, 0.5, f"no {token_class}-entropy tokens above the minimum count", ha="center")
    ax.set_axis_off()
    ax.set_title(f"most frequent {token_class}-entropy tokens")
    _save(fig, path)


def entropy_by_position(table: TokenTable, responses: list[int], stats: dict, path) -> None:
    """Entropy against position for a few trajectories, with the forking threshold."""
    fig, axes = plt.subplots(
        len(responses), 1, figsize=(9, 1.6 * len(responses) + 0.5), sharex=True, squeeze=False
    )
    thr = stats["forking_threshold"]
    for ax, i in zip(axes[:, 0], responses, strict=True):
        h = table.response_tokens(i, "entropy")
        ax.plot(np.arange(len(h)), h, lw=0.9, color="#4c72b0")
        ax.scatter(np.flatnonzero(h > thr), h[h > thr], s=8, color="#c44e52", zorder=3)
        ax.axhline(thr, color="#c44e52", lw=0.7, ls="--")
        correct = int(table["responses/correct"][i])
        mark = {1: "correct", 0: "wrong", -1: "ungraded"}[correct]
        ax.set_ylabel("H (nats)", fontsize=8)
        ax.set_title(
            f"response {i} (prompt {table['responses/prompt_index'][i]}, {mark})",
            fontsize=8,
            loc="left",
        )
    axes[-1, 0].set_xlabel("position in response (tokens)")
    fig.suptitle(
        f"token entropy along trajectories (red: above P{stats['forking_percentile']:g})",
        fontsize=10,
    )
    _save(fig, path)


def log_position(entropy: np.ndarray, top: float) -> np.ndarray:
    """Where each entropy sits in [0, 1] on a log10 scale from LOG_FLOOR to `top`: near-zero
    tokens stay distinguishable (a linear scale paints almost all of them one colour)."""
    lo, hi = np.log10(LOG_FLOOR), np.log10(max(top, LOG_FLOOR * 10))
    x = (np.log10(np.clip(np.asarray(entropy, dtype=np.float64), LOG_FLOOR, None)) - lo) / (hi - lo)
    return np.clip(x, 0, 1)


def _colour_scale(entropy: np.ndarray, top: float):
    cmap = matplotlib.colormaps["magma_r"]
    return cmap(log_position(entropy, top) * 0.85)  # stop short of black so text stays readable


def hex_colour(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in rgba[:3]))


def token_view_html(table: TokenTable, responses: list[int], stats: dict, path) -> None:
    """Self-contained HTML: each response's tokens coloured by entropy, tooltips with the values."""
    top = float(np.percentile(table["tokens/entropy"], 99.5)) or 1.0
    blocks = []
    for i in responses:
        sl = table.response_slice(i)
        h = table["tokens/entropy"][sl]
        ids = table["tokens/token_id"][sl]
        lps = table["tokens/logprob"][sl]
        texts = token_texts(table, ids)
        colours = _colour_scale(h, top)
        spans = []
        for pos, (t, e, tid, lp, c) in enumerate(zip(texts, h, ids, lps, colours, strict=True)):
            fg = "white" if (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 0.5 else "black"
            tip = f"pos {pos} · id {tid} · H = {e:.4g} nats · log p = {lp:.3g}"
            shown = html.escape(t).replace("\n", "⏎<br>")
            spans.append(
                f'<span style="background:{hex_colour(c)};color:{fg}" title="{tip}">{shown}</span>'
            )
        p = int(table["responses/prompt_index"][i])
        correct = {1: "✓ correct", 0: "✗ wrong", -1: "ungraded"}[int(table["responses/correct"][i])]
        blocks.append(
            f"<section><h3>response {i} · prompt {p} · sample {table['responses/sample_index'][i]} · "
            f"{len(h)} tokens · {correct}</h3>"
            f'<pre class="prompt">{html.escape(str(table["prompts/text"][p]))}</pre>'
            f'<div class="tokens">{"".join(spans)}</div></section>'
        )
    ticks = [LOG_FLOOR, 1e-3, 1e-2, 1e-1, 1.0, top]
    legend = "".join(
        f'<span style="background:{hex_colour(_colour_scale(np.array([t]), top)[0])};color:{"white" if t > 0.3 else "black"}">{t:.3g}</span>'
        for t in sorted(set(ticks))
        if t <= top
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>token entropy</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} .tokens{{font-family:monospace;line-height:1.9;white-space:pre-wrap}}
.tokens span{{padding:1px 0;border-radius:2px}} .prompt{{background:#f4f4f4;padding:.5em;white-space:pre-wrap}} .legend span{{padding:2px 8px;font-family:monospace}}</style>
</head><body><h1>Token entropy</h1>
<p>{stats["n_tokens"]:,} tokens; P{stats["forking_percentile"]:g} = {stats["forking_threshold"]:.3f} nats.
Colour is log<sub>10</sub> entropy (floor {LOG_FLOOR:g}), so the many near-zero tokens stay distinguishable. Hover a token for its values.</p>
<p class="legend">nats: {legend}</p>
{"".join(blocks)}</body></html>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)


def training_curves(rows: list[dict], path, title: str = "") -> None:
    """Per step (manifest rows): reward; entropy mean and percentiles; the step probe, predicted
    vs realised change of the rollouts' mean entropy over the step (training.monitor); and for
    InfoSeed-GRPO, seed accuracy and the original and seeded rollouts' entropies."""
    steps = [r["step"] for r in rows]
    infoseed = any(INFOSEED_ACCURACY in r for r in rows)  # infoseed_grpo: a fourth panel
    fig, axes = plt.subplots(3 + infoseed, 1, figsize=(7, 8 + 2.5 * infoseed), sharex=True)
    axes[0].plot(steps, [r.get("reward_mean") for r in rows], marker="o", ms=3, color="#55a868")
    axes[0].set_ylabel("mean reward")
    for key, style in (("mean", "-"), ("p50", ":"), ("p80", "--"), ("p90", "-."), ("p99", ":")):
        axes[1].plot(steps, [r.get(key) for r in rows], style, label=key)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("token entropy (nats)")
    axes[1].legend(fontsize=7, ncol=5, loc="center right")
    probe = (
        (PROBE_PREDICTED, dict(marker="o", ms=3, label="predicted ⟨∇H̄, Δθ⟩")),
        (PROBE_REALISED, dict(marker="x", ms=4, label="realised H̄(θ+Δθ) − H̄(θ)")),
        (PROBE_COVARIANCE, dict(ls=":", marker="^", ms=3, label="covariance -κ Cov(log π, A)")),
    )
    probed = [r for r in rows if PROBE_PREDICTED in r]  # every probe_every-th step
    if probed:
        for key, style in probe:
            if all(key in r for r in probed):
                axes[2].plot([r["step"] for r in probed], [r[key] for r in probed], **style)
        axes[2].axhline(0, color="grey", lw=0.5)
        axes[2].legend(fontsize=7)
    else:
        axes[2].text(0.5, 0.5, "step probe off", ha="center", transform=axes[2].transAxes)
    axes[2].set_ylabel("step probe: Δ mean entropy (nats)")
    if infoseed:
        _infoseed_panel(axes[3], rows)
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"training run {title}", fontsize=10)
    _save(fig, path)


INFOSEED_ACCURACY = "infoseed/seed_accuracy"


def _infoseed_panel(ax, rows: list[dict]) -> None:
    """InfoSeed-GRPO per step: seed accuracy and its chance level (left axis), and the mean token
    entropy of the original and the seeded rollouts (right axis)."""
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r.get(INFOSEED_ACCURACY) for r in rows], marker="o", ms=3, color="#8172b2")
    chance = [r.get(f"{INFOSEED_ACCURACY}_chance") for r in rows]
    ax.plot(steps, chance, ":", color="#8172b2", label="chance (this batch's seed counts)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("seed accuracy", color="#8172b2")
    right = ax.twinx()
    for key, style in (("entropy_original", "-"), ("entropy_seeded", "--")):
        values = [r.get(f"infoseed/{key}") for r in rows]
        right.plot(steps, values, style, color="#c44e52", label=key.replace("_", " "))
    right.set_ylabel("token entropy (nats)", color="#c44e52")
    right.legend(fontsize=7, loc="center right")


DELTA_H_PREDICTORS = (  # (Estimates field, label): every interval, the ground truth first
    ("truth", "ΔH ground truth (control variate)"),
    ("snis", "ΔH plain SNIS (baseline)"),
    ("first_order", "δH₁ first order"),
    ("first_order_gradient_part", "δH₁ gradient part"),
    ("first_order_remainder", "δH₁ momentum + decay"),
    ("covariance", "covariance predictor (Cui et al.)"),
    ("nonlinearity", "nonlinearity ΔH - ηH'(0)"),
)


def _ci_bar(ax, x, interval, i, **kw):
    value, lo, hi = interval.at(i)
    ax.errorbar(x, value, yerr=[[value - lo], [hi - value]], capsize=3, **kw)


def delta_h_figures(results: list, loglog_path, first_order_path, checkpoints_path) -> None:
    """The figures of one run's ΔH results (checkpoint.delta_h_result.DeltaHResult)."""
    results = sorted(results, key=lambda r: r.step)
    delta_h_per_unit_step_figure(results, loglog_path)
    delta_h_predictors_figure(results, first_order_path)
    delta_h_checkpoints_figure(results, checkpoints_path)


def delta_h_per_unit_step_figure(results: list, path) -> None:
    """ΔH(η) per unit step (η / lr) with its interval: flat where the change is linear in η,
    at the level of δH₁ (its interval shaded) where the first order holds."""
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(results)))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, (r, c) in enumerate(zip(results, colours, strict=True)):
        e = r.estimates
        x = e.eta / r.lr
        y, ci = e.truth.value / x, e.truth.ci / x[:, None]
        ax.errorbar(
            x * (1 + 0.04 * (j - 1)),  # side by side
            y,
            yerr=[y - ci[:, 0], ci[:, 1] - y],
            fmt="o",
            color=c,
            ms=4,
            capsize=2,
            label=f"step {r.step}: ΔH / (η/lr), 95% CI; line: δH₁ at lr "
            f"(verdict: {r.verdict_at_lr})",
        )
        first, first_ci = e.first_order.value / x, e.first_order.ci / x[:, None]
        ax.plot(x, first, "--", color=c, lw=1)
        ax.fill_between(x, first_ci[:, 0], first_ci[:, 1], color=c, alpha=0.08, lw=0)
    ax.set_xscale("log")
    ticks = results[0].estimates.eta / results[0].lr
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("η / learning rate (1 = the training step)")
    ax.set_ylabel("ΔH(η) / (η / lr)  (nats per training step)")
    ax.legend(fontsize=7)
    ax.set_title("entropy change of one update step, per unit step", fontsize=10)
    _save(fig, path)


def delta_h_predictors_figure(results: list, path) -> None:
    """Per checkpoint at η = lr: every predictor with its interval against the ground truth."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        e, i = r.estimates, r.at_lr
        value, lo, hi = e.truth.at(i)
        ax.axhspan(lo, hi, color="C0", alpha=0.15, lw=0)
        ax.axhline(value, color="C0", lw=1)
        for k, (name, label) in enumerate(DELTA_H_PREDICTORS[:-1]):
            _ci_bar(ax, k, getattr(e, name), i, fmt="o", color=f"C{k}", label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks([])
        lo, hi = e.relative_error_ci[i]
        bounds = f"[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "(interval unbounded)"
        ax.set_title(
            f"step {r.step}, η = lr: {r.verdict_at_lr} ({r.e_responses} E responses)\n"
            f"δH₁ relative error {e.relative_error[i]:+.2f} {bounds}",
            fontsize=8,
        )
    axes[0][0].set_ylabel("entropy change (nats), 95% intervals")
    axes[0][0].legend(fontsize=6, loc="best")
    _save(fig, path)


def delta_h_checkpoints_figure(results: list, path) -> None:
    """Across checkpoints at η = lr: the predictors and the nonlinearity, with intervals."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = np.array([r.step for r in results], dtype=float)
    width = 0.6 * (np.diff(steps).min() if len(steps) > 1 else 1.0) / len(DELTA_H_PREDICTORS)
    for k, (name, label) in enumerate(DELTA_H_PREDICTORS):
        for j, r in enumerate(results):
            _ci_bar(
                ax,
                steps[j] + (k - len(DELTA_H_PREDICTORS) / 2) * width,
                getattr(r.estimates, name),
                r.at_lr,
                fmt="os^v<>x"[k % 7],
                color=f"C{k}",
                label=label if j == 0 else None,
            )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("entropy change at η = lr (nats), 95% intervals")
    ax.legend(fontsize=6)
    _save(fig, path)


def fisher_figure(results: list, path) -> None:
    """Per checkpoint (rows, checkpoint.fisher_run.FisherResult): K heat-map, same- vs
    different-prompt entries, singular values, and each training sequence's contribution to
    δH₁ against its advantage."""
    results = sorted(results, key=lambda r: r.step)
    fig, axes = plt.subplots(len(results), 4, figsize=(15, 3.2 * len(results)), squeeze=False)
    for row, d in zip(axes, results, strict=True):
        k = d.K
        lim = np.abs(k).max() or 1.0
        im = row[0].imshow(k, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=row[0], fraction=0.046)
        row[0].set_title(
            f"step {d.step}: K (E x U); identity err {d.identity_relative_error:.1e}",
            fontsize=8,
        )
        row[0].set_xlabel("U-batch sequence")
        row[0].set_ylabel("E-batch sequence")
        same = d.e_dataset_index[:, None] == d.u_dataset_index[None, :]
        bins = np.linspace(k.min(), k.max(), 40)
        row[1].hist(
            k[~same],
            bins=bins,
            alpha=0.6,
            density=True,
            label=f"different prompt ({(~same).sum()})",
        )
        if same.any():
            row[1].hist(
                k[same], bins=bins, alpha=0.6, density=True, label=f"same prompt ({same.sum()})"
            )
        row[1].set_yscale("log")
        row[1].legend(fontsize=7)
        row[1].set_title("entries of K", fontsize=8)
        sv = d.singular_values
        row[2].semilogy(np.arange(1, len(sv) + 1), sv, "o-", ms=3)
        row[2].set_title("singular values of K", fontsize=8)
        sc = row[3].scatter(d.u_advantage, d.u_contribution, c=d.u_length, s=12, cmap="viridis")
        fig.colorbar(sc, ax=row[3], fraction=0.046, label="length")
        row[3].axhline(0, color="grey", lw=0.5)
        row[3].set_xlabel("advantage")
        row[3].set_title("contribution to δH₁/η per training sequence", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def temperature_sweep_figure(table: pd.DataFrame, path, title: str = "") -> None:
    """Heat-maps of Avg@1 and Pass@k_max over T_high (rows) x T_low (columns)."""
    from entroflow.eval.sweep import metric_grid

    ks = sorted(int(c.split("@")[1]) for c in table.columns if c.startswith("pass@"))
    metrics = ["avg@1" if "avg@1" in table else f"pass@{ks[0]}", f"pass@{ks[-1]}"]
    metrics = list(dict.fromkeys(metrics))
    threshold = float(table["threshold"].iloc[0])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        grid = metric_grid(table, metric)
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{t:g}" for t in grid.index])
        ax.set_xlabel("T_low (other tokens)")
        ax.set_ylabel(f"T_high (entropy > {threshold:.3g})")
        ax.set_title(metric)
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(
                j,
                i,
                f"{value:.3f}",
                ha="center",
                va="center",
                color="white" if value < 0.6 else "black",
            )
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"forking-token temperature sweep {title}".strip(), fontsize=10)
    _save(fig, path)
