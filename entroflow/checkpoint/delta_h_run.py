"""The per-checkpoint ΔH stage: batches, the replayed update direction, the η sweep, the file.

For a checkpoint θ with AdamW state:
  U-batch: B_U prompts x G responses with rewards and group advantages; all-equal groups dropped
  v = Δθ / lr from replaying one AdamW step on the U-batch's RL gradient (adam.replay_adamw)
  E-batch: B_E prompts (unfiltered: the data distribution), one response each from π_θ (the first
  draws); then, while ΔH(lr)'s 95% interval is wider than ±target_half_width·|ΔH|, the responses
  per prompt double, up to e_samples_max
  δH₁(η) = η ⟨∇H, v⟩ from per-sequence terms of one forward-mode JVP along v over every response
  (and one along the gradient part: the momentum + weight-decay remainder is the difference)
  ΔH_true(η) = δH₁(η) + R(η), R = SNIS(η) minus its own linearisation on the first draws at
  θ ± ηv (delta_h_stats); plain SNIS kept as the baseline; intervals by bootstrap over prompts;
  δH₁'s relative error -R/ΔH with Fieller's interval and a verdict
η is given relative to the checkpoint's learning rate: η = lr is the step training would take.
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

from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.estimators import delta_h_stats as st
from entroflow.estimators.adam import AdamStep, replay_adamw
from entroflow.estimators.delta_h import (
    fit_loglog,
    functional_values,
    score_sequences,
    shifted,
)
from entroflow.io import TokenTable, flatten
from entroflow.lm.tangents import ScoresWithTangent, score_with_tangent
from entroflow.tokens.pipeline import generation_table
from entroflow.training.algorithms import algorithm, rl_loss
from entroflow.training.rewards import correctness_rewards, format_rewards

log = logging.getLogger(__name__)
MAXENT_STATE_FILE = "maxent_state.json"  # τ, β in a maxent_grpo checkpoint (training.trainer)
GROUND_TRUTH_METHOD = (
    "control variate: causal first order η⟨∇H, v⟩ (forward-mode JVP, every E response) + SNIS's "
    "remainder beyond its own linearisation (first draws); 95% interval: normal, bootstrap over "
    "E prompts; E responses per prompt doubled until the target width or the cap"
)
ACCUM = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class DeltaHSettings:
    e_prompts: int = 256  # the schema's default too
    e_samples_max: int = 1  # responses per E prompt, grown by doubling while ΔH is too wide
    target_half_width: float = 0.2  # ... i.e. its 95% half-width at η = lr over |ΔH|
    u_prompts: int = 8
    eta_scale: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    estimator: str = "rb"  # rb | surprisal
    normalisation: str = "sequence"  # sequence | token
    clip: float | None = None
    bootstrap: int = 200
    accum_dtype: str = "float64"
    tf32: bool = False
    seed: int = 0


@dataclass
class RunShape:
    """What the update replay needs to know about the training run."""

    algorithm: str
    group_size: int
    max_new_tokens: int
    temperature: float
    format_reward: float
    maxent: dict = field(default_factory=dict)  # maxent_grpo: reward_temperature, floor
    maxent_state: dict = field(default_factory=dict)  # maxent_grpo: the checkpoint's τ, β


def u_batch_advantages(
    model, u_prompts, u_responses, rewards: np.ndarray, run: RunShape, pad: int, accum
) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and the mask of sequences with an RL gradient, as the run's trainer makes them.

    grpo / dr_grpo: group advantages (scaled for grpo); groups with all-equal rewards dropped.
    maxent_grpo: listwise A_i = G w_i - 1 with w = maxent_weights(rewards, log π_ref(y), τ, β) at
    the checkpoint's controller state (the reference is the model with its adapter disabled), so
    every group moves: w still depends on π_ref where the rewards are equal.
    """
    g = run.group_size
    algo = algorithm(run.algorithm)
    if not algo.listwise:
        return algo.group_advantages(rewards, g), algo.informative(rewards, g)
    from entroflow.training.maxent import maxent_advantages, maxent_weights

    with torch.no_grad(), model.disable_adapter():
        ref = score_sequences(
            model, u_prompts, u_responses, pad_token_id=pad, temperature=1.0, accum_dtype=accum
        )
    ref_logprob = np.array([float(lp.double().sum()) for lp in ref.logprob])
    state = {"tau": 1.0, "beta": 0.05, **run.maxent.get("controller", {}), **run.maxent_state}
    w = maxent_weights(
        rewards.reshape(-1, g),
        ref_logprob.reshape(-1, g),
        state["tau"],
        state["beta"],
        run.maxent.get("reward_temperature", 0.5),
        run.maxent.get("floor", 1e-3),
    )
    return maxent_advantages(w), np.ones(len(rewards), dtype=bool)


def sample_batch(model, tokenizer, prompt_ids, rows, samples: int, run: RunShape, seed: int):
    engine = HFEngine(model, tokenizer, batch_size=64)
    params = SamplingParams(
        temperature=run.temperature,
        max_new_tokens=run.max_new_tokens,
        samples_per_prompt=samples,
        seed=seed,
    )
    return engine.generate([prompt_ids[i] for i in rows], params)


def batch_table(problems, prompt_ids, rows, gens, tokenizer, extra: dict) -> TokenTable:
    """A sampled batch in the contract layout (the generation stage's table) plus extra columns."""
    sub = problems.iloc[rows].reset_index(drop=True)
    table = generation_table(sub, [prompt_ids[i] for i in rows], gens, tokenizer, rows, attrs={})
    table.groups["responses"].update(extra)
    return table


def replay_step(
    model, prompts, responses, advantages, run: RunShape, adam_state, pad: int, accum
) -> AdamStep:
    """The update direction: one AdamW step replayed on the RL gradient of the given sequences."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scores = score_sequences(
        model, prompts, responses, pad_token_id=pad, temperature=run.temperature, accum_dtype=accum
    )
    loss = rl_loss(scores, advantages, run.algorithm, run.max_new_tokens)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    return replay_adamw({n: p.detach() for n, p in params.items()}, grads, adam_state)


def _timed(clock: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    clock.setdefault(key, []).append(time.perf_counter() - t0)
    return out


SWEEP_KEYS = ("log_ratio", "h_new", "log_ratio_minus", "h_new_minus")


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


def _tangents(clock: dict, score, model, step: AdamStep):
    """Exact tangents of one batch's scores along v and along its gradient part."""
    total = _timed(clock, "jvp", lambda: score_with_tangent(score, model, step.direction))
    grad = _timed(clock, "jvp", lambda: score_with_tangent(score, model, step.gradient_part))
    return total, grad


def sweep_estimates(
    batch: EBatch,
    sweep: dict[str, np.ndarray],
    etas: np.ndarray,
    cov_per_unit: np.ndarray,
    settings: DeltaHSettings,
    per_token: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every estimate and interval over η, and the first-order slopes' replicates.

    The slope uses every response; SNIS, its remainder R(η) and the ESS use the first draws
    (`sweep`: (η, N_first) log-ratios and values at θ ± ηv), which come first in `batch`. One
    bootstrap over prompts serves both, so ΔH = η·slope + R(η) keeps their covariance.
    """
    arrays = batch.arrays()
    tangents = batch.tangents(arrays.mask.shape[1])
    counts = st.cluster_counts(batch.prompt_rows, settings.bootstrap, settings.seed)
    n_first = sweep["log_ratio"].shape[1]
    first_counts = counts[:, :n_first]  # a first draw's count is its prompt's
    slopes = {
        k: st.first_order_slope(arrays, t, counts, settings.estimator, per_token)
        for k, t in tangents.items()
    }
    a_old = arrays.values(settings.estimator)[:n_first]
    d = arrays.denominators(per_token)[:n_first]
    t_v = tangents["total"]
    snis_linear = st.snis_slope(
        a_old, t_v.values(settings.estimator)[:n_first], t_v.score[:n_first], d, first_counts
    )
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
        cis = {
            "delta_h_true": st.interval(truth),
            "delta_h_true_sym": st.interval((truth - truth_minus) / 2),
            "delta_h_snis": st.interval(reps["snis"]),
            "delta_h_snis_minus": st.interval(reps["snis_minus"]),
            "delta_h_first_order": st.interval(first),
            "delta_h_first_order_gradient_part": st.interval(eta * slopes["gradient_part"]),
            "delta_h_first_order_remainder": st.interval(eta * slopes["remainder"]),
            "delta_h_cov": st.interval(eta * cov_per_unit),
            "nonlinearity": st.interval(reps["nonlinearity"]),
        }
        for key, (value, se, lo, hi) in cis.items():
            add(key, value)
            add(key + "_ci", (lo, hi))
            add(key + "_stderr", se)
        # δH₁'s relative error (δH₁ - ΔH) / ΔH = -R / ΔH on shared samples, Fieller's interval.
        ratio = st.RatioInterval.from_replicates(-reps["nonlinearity"], truth)
        add("relative_error", ratio.estimate)
        add("relative_error_ci", ratio.bounds)
        add("verdict", ratio.verdict())
    est = {k: np.asarray(v) for k, v in rows.items()}
    est["verdict"] = est["verdict"].astype(object)
    return est, slopes


def relative_half_width(est: dict[str, np.ndarray], i: int) -> float:
    """ΔH's 95% half-width over |ΔH| at η index i."""
    lo, hi = est["delta_h_true_ci"][i]
    return float((hi - lo) / 2 / max(abs(est["delta_h_true"][i]), 1e-300))


def covariance_predictor_replicates(
    model, u_prompts, u_responses, u_keep, advantages, v, run, settings, pad, accum
) -> np.ndarray:
    """The covariance predictor (Cui et al. 2025) per token and unit step on the U-batch,
    (1 + bootstrap,) replicates over its groups."""
    u_jvp = score_with_tangent(
        lambda: score_sequences(
            model,
            u_prompts,
            u_responses,
            pad_token_id=pad,
            temperature=run.temperature,
            accum_dtype=accum,
        ),
        model,
        v,
    )
    u_groups = np.unique([g.prompt_row for g in u_keep], return_inverse=True)[1]
    replicates = st.covariance_predictor(
        [lp.sum() for lp in u_jvp.logprob],
        [len(lp) for lp in u_jvp.logprob],
        [d.sum() for d in u_jvp.d_logprob],
        advantages,
        st.cluster_counts(u_groups, settings.bootstrap, settings.seed + 1),
    )
    if u_groups.max() < 1:  # one informative group: resampling it gives a zero-width interval
        log.warning("one informative U-batch group: the covariance predictor has no interval")
        replicates[1:] = np.nan
    return replicates


def estimate_delta_h(
    model,
    tokenizer,
    problems: pd.DataFrame,
    prompt_ids: list[list[int]],
    adam_state: dict[str, dict],
    run: RunShape,
    settings: DeltaHSettings,
) -> tuple[TokenTable, dict]:
    """All of the stage on a PEFT model at the checkpoint. Returns the file's tables and a summary."""
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    accum = ACCUM[settings.accum_dtype]
    pad = tokenizer.pad_token_id
    per_token = settings.normalisation == "token"
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(adam_state))
    if missing:
        raise ValueError(
            f"no optimizer state for {len(missing)} trainable parameters, e.g. {missing[0]}"
        )

    rng = np.random.default_rng(settings.seed)
    e_rows = rng.choice(len(problems), size=min(settings.e_prompts, len(problems)), replace=False)
    # U prompts are a subset of the E prompts, so the Fisher kernel has same-prompt pairs.
    u_rows = e_rows[: min(settings.u_prompts, len(e_rows))]
    model.eval()
    e_gens = sample_batch(model, tokenizer, prompt_ids, e_rows, 1, run, settings.seed)
    u_gens = sample_batch(
        model, tokenizer, prompt_ids, u_rows, run.group_size, run, settings.seed + 1
    )
    log.info(
        "sampled E-batch %d and U-batch %d responses (%.0f s)",
        len(e_gens),
        len(u_gens),
        time.perf_counter() - t0,
    )

    # U-batch: rewards and the run's advantages (grpo / dr_grpo drop all-equal groups).
    u_texts = tokenizer.batch_decode(
        [g.token_ids.tolist() for g in u_gens], skip_special_tokens=True
    )
    answers = [problems["answer"].iloc[u_rows[g.prompt_row]] for g in u_gens]
    correct = np.asarray(correctness_rewards(u_texts, answers))
    rewards = correct + run.format_reward * np.asarray(format_rewards(u_texts))
    all_prompts = [prompt_ids[u_rows[g.prompt_row]] for g in u_gens]
    advantages, kept = u_batch_advantages(
        model, all_prompts, [g.token_ids for g in u_gens], rewards, run, pad, accum
    )
    u_keep = [g for g, k in zip(u_gens, kept, strict=True) if k]
    if not u_keep:
        raise ValueError("every U-batch group has equal rewards: no RL gradient (raise u_prompts)")

    # The update direction: replay one AdamW step on the U-batch's RL gradient.
    u_prompts = [prompt_ids[u_rows[g.prompt_row]] for g in u_keep]
    u_responses = [g.token_ids for g in u_keep]
    step = replay_step(model, u_prompts, u_responses, advantages[kept], run, adam_state, pad, accum)
    v = step.direction
    cov_per_unit = covariance_predictor_replicates(
        model, u_prompts, u_responses, u_keep, advantages[kept], v, run, settings, pad, accum
    )

    def score_fn(gens):  # the same sequences and settings at θ and at every shifted θ ± ηv
        prompts = [prompt_ids[e_rows[g.prompt_row]] for g in gens]
        responses = [g.token_ids for g in gens]
        return lambda: score_sequences(
            model,
            prompts,
            responses,
            pad_token_id=pad,
            temperature=run.temperature,
            accum_dtype=accum,
        )

    # First draws (one per prompt): values and exact tangents along v and the gradient part.
    clock: dict[str, list[float]] = {}
    score_first = score_fn(e_gens)
    with torch.no_grad():
        e_scores = _timed(clock, "forward", score_first)
    batch = EBatch()
    # Values from the plain forward, the pass every shifted θ ± ηv uses too (the JVP's primal
    # runs on SDPA's math backend and may differ in the last bits).
    batch.add(e_gens, *_tangents(clock, score_first, model, step), values=e_scores)
    first = batch.arrays()
    # Per-token change (Cui et al.); the sequence functional Σ_t H_t sums it over a response.
    cov_per_unit *= 1.0 if per_token else float(first.lengths.mean())

    # The η sweep on the first draws: θ ± ηv, the same sequences.
    etas = np.asarray(settings.eta_scale, dtype=np.float64) * step.lr
    at_lr = int(np.argmin(np.abs(etas / step.lr - 1.0)))
    s_old = first.logprob.sum(1)
    sweep: dict[str, list] = {k: [] for k in SWEEP_KEYS}
    with torch.no_grad():
        for eta in etas:
            for sign, suffix in ((1.0, ""), (-1.0, "_minus")):
                with shifted(model, v, sign * eta):
                    new = _timed(clock, "sweep", score_first)
                a_new, s_new, _ = functional_values(new, settings.estimator)
                sweep["log_ratio" + suffix].append(s_new - s_old)
                sweep["h_new" + suffix].append(a_new)
    sweep_arrays = {k: np.asarray(x) for k, x in sweep.items()}  # (η, N first draws)

    # More responses per prompt while ΔH at η = lr is wider than the target (doubling, capped).
    samples = 1
    while True:
        est, slopes = sweep_estimates(batch, sweep_arrays, etas, cov_per_unit, settings, per_token)
        half = relative_half_width(est, at_lr)
        log.info(
            "E-batch %d responses (%d per prompt): ΔH(lr) %+.4g, 95%% half-width %.0f%% of |ΔH|",
            len(batch.gens),
            samples,
            est["delta_h_true"][at_lr],
            100 * half,
        )
        if half <= settings.target_half_width or samples >= settings.e_samples_max:
            break
        more = min(2 * samples, settings.e_samples_max) - samples
        gens = sample_batch(
            model, tokenizer, prompt_ids, e_rows, more, run, settings.seed + 1 + samples
        )
        gens = [dataclasses.replace(g, sample_index=g.sample_index + samples) for g in gens]
        batch.add(gens, *_tangents(clock, score_fn(gens), model, step))
        samples += more

    log.info(
        "first-order slope <∇H, v> = %.4g ± %.2g (gradient part %.4g, momentum+decay %.4g)",
        slopes["total"][0],
        np.std(slopes["total"][1:], ddof=1),
        slopes["gradient_part"][0],
        slopes["remainder"][0],
    )
    for i, eta in enumerate(etas):
        log.info(
            "eta %.3g: ΔH %+.4g [%+.4g, %+.4g] (SNIS %+.4g ± %.2g), δH₁ %+.4g ± %.2g, "
            "nonlinearity %+.3g ± %.2g, cov %+.3g, δH₁ relative error %+.2f [%+.2f, %+.2f]: "
            "%s; ESS %.1f/%d",
            eta,
            est["delta_h_true"][i],
            *est["delta_h_true_ci"][i],
            est["delta_h_snis"][i],
            est["delta_h_snis_stderr"][i],
            est["delta_h_first_order"][i],
            est["delta_h_first_order_stderr"][i],
            est["nonlinearity"][i],
            est["nonlinearity_stderr"][i],
            est["delta_h_cov"][i],
            est["relative_error"][i],
            *est["relative_error_ci"][i],
            est["verdict"][i],
            est["ess"][i],
            len(e_gens),
        )
    est["stderr"] = est["delta_h_true_stderr"]
    est["delta_h_true_minus"] = est["delta_h_true"] - 2 * est["delta_h_true_sym"]
    est.update(sweep_arrays)  # (η, N first draws) for re-analysis
    est["eta"] = etas
    fit_slope, r2 = fit_loglog(etas, est["delta_h_true"])

    # Cost in forward passes over the first draws (sampling excluded): the wall time of every
    # pass over the median plain forward (robust to a busy machine).
    unit = float(np.median(clock["forward"] + clock["sweep"]))
    forward_equivalents = sum(map(sum, clock.values())) / unit
    log.info(
        "cost: %.1f forward-pass equivalents over the first %d draws (%d forwards, %d JVPs at "
        "%.1f each); %d responses in all; verdict at η = lr: %s, half-width %.0f%% of |ΔH|",
        forward_equivalents,
        len(e_gens),
        1 + 2 * len(etas),
        len(clock["jvp"]),
        np.median(clock["jvp"]) / unit,
        len(batch.gens),
        est["verdict"][at_lr],
        100 * half,
    )

    e_table = batch.table(problems, prompt_ids, e_rows, tokenizer)
    u_extra = {
        "reward": rewards.astype(np.float32),
        "advantage": advantages.astype(np.float32),
        "kept": kept.astype(np.int8),
        "correct": correct.astype(np.int8),
    }
    u_table = batch_table(problems, prompt_ids, u_rows, u_gens, tokenizer, u_extra)
    groups = {"": est}
    groups.update({f"e_batch/{g}": d for g, d in e_table.groups.items()})
    groups.update({f"u_batch/{g}": d for g, d in u_table.groups.items()})
    summary = {
        "lr": step.lr,
        "entropy": float(
            first.values(settings.estimator).sum() / first.denominators(per_token).sum()
        ),
        "slope_total": float(slopes["total"][0]),
        "slope_gradient_part": float(slopes["gradient_part"][0]),
        "slope_remainder": float(slopes["remainder"][0]),
        "loglog_slope": fit_slope,
        "loglog_r2": r2,
        "verdict_at_lr": str(est["verdict"][at_lr]),
        "ground_truth_method": GROUND_TRUTH_METHOD,
        "forward_equivalents": forward_equivalents,
        "e_responses": len(batch.gens),
        "e_prompts": len(e_gens),
        "e_samples_per_prompt": samples,
        "relative_half_width_at_lr": half,
        "u_responses_kept": int(kept.sum()),
        "u_responses": len(u_gens),
        "seconds": time.perf_counter() - t0,
    }
    return TokenTable(groups=groups), summary
