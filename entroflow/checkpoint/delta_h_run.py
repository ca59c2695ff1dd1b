"""The per-checkpoint ΔH stage: batches, the replayed update direction, the η sweep, the result.

For a checkpoint θ with AdamW state:
  U-batch: B_U prompts x G responses with rewards and group advantages; all-equal groups dropped
  v = Δθ / lr from replaying one AdamW step on the U-batch's RL gradient (checkpoint.replay)
  E-batch: B_E prompts (unfiltered: the data distribution), one response each from π_θ (the first
  draws); then, while ΔH(lr)'s 95% interval is wider than ±target_half_width·|ΔH|, the responses
  per prompt double, up to e_samples_max
  δH₁(η) = η ⟨∇H, v⟩ from per-sequence terms of one forward-mode JVP along v over every response
  (and one along the gradient part: the momentum + weight-decay remainder is the difference)
  ΔH_true(η) = δH₁(η) + R(η), R = SNIS(η) minus its own linearisation on the first draws at
  θ ± ηv (delta_h_stats); plain SNIS kept as the baseline; intervals by bootstrap over prompts;
  δH₁'s relative error -R/ΔH with Fieller's interval and a verdict
η is given relative to the checkpoint's learning rate: η = lr is the step training takes.
The growth looks at the estimate it is growing (at most log2(e_samples_max) + 1 looks), which
can bias coverage slightly; the calibration tests use a fixed batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from entroflow.checkpoint.delta_h_result import (
    INTERVAL_NAMES,
    SWEEP_KEYS,
    DeltaHResult,
    Estimates,
    Interval,
    index_at_lr,
)
from entroflow.checkpoint.detailed_log import DeltaHLog, rule_log_level
from entroflow.checkpoint.e_batch import EBatch, tangents_along, timed
from entroflow.checkpoint.replay import draw_u_batch, replay_step, sample_batch
from entroflow.checkpoint.settings import DeltaHSettings, RunShape
from entroflow.estimators import delta_h_stats as st
from entroflow.estimators.adam import AdamStep
from entroflow.estimators.delta_h import fit_loglog, functional_values, score_sequences, shifted
from entroflow.lm.tangents import score_with_tangent

log = logging.getLogger(__name__)
GROUND_TRUTH_METHOD = (
    "control variate: causal first order η⟨∇H, v⟩ (forward-mode JVP, every E response) + SNIS's "
    "remainder beyond its own linearisation (first draws); 95% interval: normal, bootstrap over "
    "E prompts; E responses per prompt doubled until the target width or the cap"
)
ACCUM = {"float32": torch.float32, "float64": torch.float64}


def first_order_parts(batch: EBatch, counts, n_first: int, settings, per_token: bool):
    """The slopes' replicates over every response, and on the first draws: the functional at θ,
    its denominators and SNIS's own linearisation (what R(η) subtracts)."""
    arrays = batch.arrays()
    tangents = batch.tangents(arrays.mask.shape[1])
    slopes = {
        k: st.first_order_slope(arrays, t, counts, settings.estimator, per_token)
        for k, t in tangents.items()
    }
    a_old = arrays.values(settings.estimator)[:n_first]
    d = arrays.denominators(per_token)[:n_first]
    t_v = tangents["total"]
    snis_linear = st.snis_slope(
        a_old, t_v.values(settings.estimator)[:n_first], t_v.score[:n_first], d, counts[:, :n_first]
    )
    return slopes, a_old, d, snis_linear


def sweep_estimates(
    batch: EBatch,
    sweep: dict[str, np.ndarray],
    etas: np.ndarray,
    cov_per_unit: np.ndarray,
    settings: DeltaHSettings,
    per_token: bool,
) -> tuple[Estimates, dict[str, np.ndarray]]:
    """Every estimate and interval over η, and the first-order slopes' replicates.

    The slope uses every response; SNIS, its remainder R(η) and the ESS use the first draws
    (`sweep`: (η, N_first) log-ratios and values at θ ± ηv), which come first in `batch`. One
    bootstrap over prompts serves both, so ΔH = η·slope + R(η) keeps their covariance.
    """
    counts = st.cluster_counts(batch.prompt_rows, settings.bootstrap, settings.seed)
    n_first = sweep["log_ratio"].shape[1]
    first_counts = counts[:, :n_first]  # a first draw's count is its prompt's
    slopes, a_old, d, snis_linear = first_order_parts(batch, counts, n_first, settings, per_token)
    rows: dict[str, list] = {}

    def add(key, value):
        rows.setdefault(key, []).append(value)

    for i, eta in enumerate(etas):
        reps = {}
        for sign, suffix in ((1.0, ""), (-1.0, "_minus")):
            log_ratio, h_new = sweep["log_ratio" + suffix][i], sweep["h_new" + suffix][i]
            snis = st.snis(a_old, h_new, log_ratio, d, first_counts)  # unclipped: unbiased
            reps["snis" + suffix] = st.snis(a_old, h_new, log_ratio, d, first_counts, settings.clip)
            reps["nonlinearity" + suffix] = snis - sign * eta * snis_linear
            add("ess" + suffix, st.ess(log_ratio))
            add("clip_fraction" + suffix, st.clipped_fraction(log_ratio, settings.clip))
        first = eta * slopes["total"]
        truth = first + reps["nonlinearity"]
        truth_minus = -first + reps["nonlinearity_minus"]
        replicates = {  # (1 + bootstrap,) per Estimates field
            "truth": truth,
            "truth_sym": (truth - truth_minus) / 2,
            "snis": reps["snis"],
            "snis_minus": reps["snis_minus"],
            "first_order": first,
            "first_order_gradient_part": eta * slopes["gradient_part"],
            "first_order_remainder": eta * slopes["remainder"],
            "covariance": eta * cov_per_unit,
            "nonlinearity": reps["nonlinearity"],
        }
        for key, values in replicates.items():
            add(key, st.interval(values))  # (value, stderr, lo, hi)
        # δH₁'s relative error (δH₁ - ΔH) / ΔH = -R / ΔH on shared samples, Fieller's interval.
        ratio = st.RatioInterval.from_replicates(-reps["nonlinearity"], truth)
        add("relative_error", ratio.estimate)
        add("relative_error_ci", ratio.bounds)
        add("verdict", ratio.verdict())
    return to_estimates(rows, etas), slopes


def to_estimates(rows: dict[str, list], etas: np.ndarray) -> Estimates:
    """Per-η rows (intervals as (value, stderr, lo, hi)) as one Estimates."""
    intervals = {}
    for key in INTERVAL_NAMES:
        value, stderr, lo, hi = (np.asarray(x) for x in zip(*rows.pop(key), strict=True))
        intervals[key] = Interval(value, np.stack([lo, hi], axis=1), stderr)
    verdict = np.asarray(rows.pop("verdict"), dtype=object)
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    return Estimates(eta=etas, **intervals, **arrays, verdict=verdict)


def relative_half_width(est: Estimates, i: int) -> float:
    """ΔH's 95% half-width over |ΔH| at η index i."""
    value, lo, hi = est.truth.at(i)
    return (hi - lo) / 2 / max(abs(value), 1e-300)


@dataclass
class _Stage:
    """What every step of the stage shares: the model at θ, the run and the wall clock."""

    model: torch.nn.Module
    tokenizer: object
    prompt_ids: list[list[int]]
    run: RunShape
    settings: DeltaHSettings
    clock: dict[str, list[float]] = field(default_factory=dict)
    details: DeltaHLog = field(default_factory=DeltaHLog)  # detailed logs (off: no folder)

    @property
    def accum(self) -> torch.dtype:
        return ACCUM[self.settings.accum_dtype]

    @property
    def per_token(self) -> bool:
        return self.settings.normalisation == "token"

    def scorer(self, prompts, responses):
        """The same sequences and settings at θ and at every shifted θ ± ηv."""
        return lambda: score_sequences(
            self.model,
            prompts,
            responses,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.run.temperature,
            accum_dtype=self.accum,
        )

    def e_scorer(self, gens, e_rows):
        return self.scorer(
            [self.prompt_ids[e_rows[g.prompt_row]] for g in gens], [g.token_ids for g in gens]
        )


def covariance_predictor_replicates(stage: _Stage, u_batch, v) -> np.ndarray:
    """The covariance predictor (Cui et al. 2025) per token and unit step on the U-batch,
    (1 + bootstrap,) replicates over its groups."""
    u_jvp = score_with_tangent(stage.scorer(u_batch.prompts, u_batch.responses), stage.model, v)
    if stage.details.active:
        stage.details.u_scores = u_jvp
    u_groups = np.unique([g.prompt_row for g in u_batch.kept_gens], return_inverse=True)[1]
    settings = stage.settings
    replicates = st.covariance_predictor(
        [lp.sum() for lp in u_jvp.logprob],
        [len(lp) for lp in u_jvp.logprob],
        [d.sum() for d in u_jvp.d_logprob],
        u_batch.advantages[u_batch.kept],
        st.cluster_counts(u_groups, settings.bootstrap, settings.seed + 1),
    )
    if u_groups.max() < 1:  # one informative group: resampling it gives a zero-width interval
        log.warning("one informative U-batch group: the covariance predictor has no interval")
        replicates[1:] = np.nan
    return replicates


def first_draws(stage: _Stage, e_gens, e_rows, step: AdamStep) -> EBatch:
    """One response per E prompt: values at θ and exact tangents along v and its gradient part."""
    score_first = stage.e_scorer(e_gens, e_rows)
    with torch.no_grad():
        e_scores = timed(stage.clock, "forward", score_first)
    batch = EBatch()
    # Values from the plain forward, the pass every shifted θ ± ηv uses too (the JVP's primal
    # runs on SDPA's math backend and may differ in the last bits).
    batch.add(e_gens, *tangents_along(stage.clock, score_first, stage.model, step), values=e_scores)
    return batch


def eta_sweep(stage: _Stage, first: EBatch, e_rows, v, etas) -> dict[str, np.ndarray]:
    """(η, N first draws) log-ratios and functional values at θ ± ηv, the same sequences."""
    score_first = stage.e_scorer(first.gens, e_rows)
    s_old = first.arrays().logprob.sum(1)
    sweep: dict[str, list] = {k: [] for k in SWEEP_KEYS}
    with torch.no_grad():
        for eta in etas:
            for sign, suffix in ((1.0, ""), (-1.0, "_minus")):
                with shifted(stage.model, v, sign * eta):
                    new = timed(stage.clock, "sweep", score_first)
                stage.details.sweep_scores(eta, suffix, new)
                a_new, s_new, _ = functional_values(new, stage.settings.estimator)
                sweep["log_ratio" + suffix].append(s_new - s_old)
                sweep["h_new" + suffix].append(a_new)
    return {k: np.asarray(x) for k, x in sweep.items()}


def grow_to_target(stage: _Stage, batch: EBatch, sweep, etas, cov_per_unit, step, e_rows):
    """More responses per prompt while ΔH at η = lr is wider than the target (doubling, capped).
    Returns (estimates, slopes, responses per prompt, relative half-width at lr)."""
    settings, at_lr = stage.settings, index_at_lr(etas, step.lr)
    samples = 1
    while True:
        est, slopes = sweep_estimates(batch, sweep, etas, cov_per_unit, settings, stage.per_token)
        half = relative_half_width(est, at_lr)
        log.info(
            "E-batch %d responses (%d per prompt): ΔH(lr) %+.4g, 95%% half-width %.0f%% of |ΔH|",
            len(batch.gens),
            samples,
            est.truth.value[at_lr],
            100 * half,
        )
        more = min(2 * samples, settings.e_samples_max) - samples
        done = half <= settings.target_half_width or samples >= settings.e_samples_max
        stage.details.growth_round(
            batch,
            samples,
            est,
            slopes,
            half,
            at_lr,
            ("target reached" if half <= settings.target_half_width else "cap reached")
            if done
            else f"grow to {samples + more} per prompt",
        )
        if done:
            return est, slopes, samples, half
        gens = sample_batch(
            stage.model,
            stage.tokenizer,
            stage.prompt_ids,
            e_rows,
            more,
            stage.run,
            settings.seed + 1 + samples,
        )
        gens = [dataclasses.replace(g, sample_index=g.sample_index + samples) for g in gens]
        batch.add(
            gens, *tangents_along(stage.clock, stage.e_scorer(gens, e_rows), stage.model, step)
        )
        samples += more


def log_estimates(est: Estimates, slopes: dict[str, np.ndarray], n_first: int) -> None:
    log.info(
        "first-order slope <∇H, v> = %.4g ± %.2g (gradient part %.4g, momentum+decay %.4g)",
        slopes["total"][0],
        np.std(slopes["total"][1:], ddof=1),
        slopes["gradient_part"][0],
        slopes["remainder"][0],
    )
    for i, eta in enumerate(est.eta):
        log.info(
            "eta %.3g: ΔH %+.4g [%+.4g, %+.4g] (SNIS %+.4g ± %.2g), δH₁ %+.4g ± %.2g, "
            "nonlinearity %+.3g ± %.2g, cov %+.3g, δH₁ relative error %+.2f [%+.2f, %+.2f]: "
            "%s; ESS %.1f/%d",
            eta,
            *est.truth.at(i),
            est.snis.value[i],
            est.snis.stderr[i],
            est.first_order.value[i],
            est.first_order.stderr[i],
            est.nonlinearity.value[i],
            est.nonlinearity.stderr[i],
            est.covariance.value[i],
            est.relative_error[i],
            *est.relative_error_ci[i],
            est.verdict[i],
            est.ess[i],
            n_first,
        )


def forward_equivalents(clock: dict[str, list[float]]) -> float:
    """Cost in forward passes over the first draws (sampling excluded): the wall time of every
    pass over the median plain forward (robust to a busy machine)."""
    unit = float(np.median(clock["forward"] + clock["sweep"]))
    log.info(
        "cost: %d forwards, %d JVPs at %.1f forwards each",
        len(clock["forward"]) + len(clock["sweep"]),
        len(clock["jvp"]),
        np.median(clock["jvp"]) / unit,
    )
    return sum(map(sum, clock.values())) / unit


def check_adam_state(model, adam_state: dict) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = sorted(set(trainable) - set(adam_state))
    if missing:
        raise ValueError(
            f"no optimizer state for {len(missing)} trainable parameters, e.g. {missing[0]}"
        )


def adam_gradient_factor(adam_state: dict) -> float:
    """(1 - β1) / (1 - β1^t'): the new gradient's weight in the replayed step (estimators.adam)."""
    state = next(iter(adam_state.values()))
    beta1, t_next = state["betas"][0], float(state.get("step", 0)) + 1
    return (1 - beta1) / (1 - beta1**t_next)


def replay_update(stage: _Stage, u_batch, adam_state) -> tuple[AdamStep, np.ndarray]:
    """The update direction (one AdamW step replayed on the U-batch's RL gradient) and the
    covariance predictor's replicates along it (per token and unit step)."""
    step = replay_step(
        stage.model,
        u_batch.prompts,
        u_batch.responses,
        u_batch.advantages[u_batch.kept],
        stage.run,
        adam_state,
        stage.tokenizer.pad_token_id,
        stage.accum,
    )
    return step, covariance_predictor_replicates(stage, u_batch, step.direction)


def draw_batches(stage: _Stage, problems: pd.DataFrame):
    """E prompts (seeded, unfiltered) with one response each, and the U-batch on the first
    u_prompts of them (so the Fisher kernel has same-prompt pairs)."""
    settings, run = stage.settings, stage.run
    rng = np.random.default_rng(settings.seed)
    e_rows = rng.choice(len(problems), size=min(settings.e_prompts, len(problems)), replace=False)
    u_rows = e_rows[: min(settings.u_prompts, len(e_rows))]
    model, tokenizer, prompt_ids = stage.model, stage.tokenizer, stage.prompt_ids
    e_gens = sample_batch(model, tokenizer, prompt_ids, e_rows, 1, run, settings.seed)
    u_batch = draw_u_batch(
        model, tokenizer, problems, prompt_ids, u_rows, run, settings.seed + 1, stage.accum
    )
    log.info("sampled E-batch %d and U-batch %d responses", len(e_gens), len(u_batch.gens))
    return e_rows, e_gens, u_batch


def estimate_delta_h(
    model,
    tokenizer,
    problems: pd.DataFrame,
    prompt_ids: list[list[int]],
    adam_state: dict[str, dict],
    run: RunShape,
    settings: DeltaHSettings,
    log_folder: str | None = None,
) -> DeltaHResult:
    """All of the stage on a PEFT model at the checkpoint; with `log_folder`, the detailed logs
    that `settings.logging` asks for go there (checkpoint.detailed_log)."""
    with rule_log_level(settings.logging):
        return _estimate_delta_h(
            model,
            tokenizer,
            problems,
            prompt_ids,
            adam_state,
            run,
            settings,
            DeltaHLog(log_folder, settings.logging),
        )


def _estimate_delta_h(
    model, tokenizer, problems, prompt_ids, adam_state, run, settings, details: DeltaHLog
) -> DeltaHResult:
    t0 = time.perf_counter()
    check_adam_state(model, adam_state)
    stage = _Stage(model, tokenizer, prompt_ids, run, settings, details=details)
    model.eval()
    e_rows, e_gens, u_batch = draw_batches(stage, problems)

    step, cov_per_unit = replay_update(stage, u_batch, adam_state)
    batch = first_draws(stage, e_gens, e_rows, step)
    first = batch.arrays()
    # Per-token change (Cui et al.); the sequence functional Σ_t H_t sums it over a response.
    cov_per_unit *= 1.0 if stage.per_token else float(first.lengths.mean())
    etas = np.asarray(settings.eta_scale, dtype=np.float64) * step.lr
    details.eta_at_lr = etas[index_at_lr(etas, step.lr)]
    details.update(step, adam_gradient_factor(adam_state), cov_per_unit)
    sweep = eta_sweep(stage, batch, e_rows, step.direction, etas)
    est, slopes, samples, half = grow_to_target(
        stage, batch, sweep, etas, cov_per_unit, step, e_rows
    )
    at_lr = index_at_lr(etas, step.lr)
    log_estimates(est, slopes, len(e_gens))
    fit_slope, r2 = fit_loglog(etas, est.truth.value)
    result = DeltaHResult(
        estimates=est,
        sweep=sweep,
        e_batch=batch.table(problems, prompt_ids, e_rows, tokenizer),
        u_batch=u_batch.table(problems, prompt_ids, tokenizer),
        denominator={n: d.detach().float().cpu().numpy() for n, d in step.denominator.items()},
        lr=step.lr,
        adam_gradient_factor=adam_gradient_factor(adam_state),
        entropy=float(
            first.values(settings.estimator).sum() / first.denominators(stage.per_token).sum()
        ),
        slope_total=float(slopes["total"][0]),
        slope_gradient_part=float(slopes["gradient_part"][0]),
        slope_remainder=float(slopes["remainder"][0]),
        loglog_slope=fit_slope,
        loglog_r2=r2,
        verdict_at_lr=str(est.verdict[at_lr]),
        ground_truth_method=GROUND_TRUTH_METHOD,
        forward_equivalents=forward_equivalents(stage.clock),
        e_responses=len(batch.gens),
        e_prompts=len(e_gens),
        e_samples_per_prompt=samples,
        relative_half_width_at_lr=half,
        u_responses_kept=int(u_batch.kept.sum()),
        u_responses=len(u_batch.gens),
        seconds=time.perf_counter() - t0,
    )
    if details.active:
        details.result(
            result, batch, sweep, slopes, cov_per_unit, e_rows, u_batch, problems, tokenizer
        )
    return result
