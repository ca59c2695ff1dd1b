"""The per-checkpoint ΔH stage: batches, the replayed update direction, the η sweep, the file.

For a checkpoint θ with AdamW state:
  E-batch: B_E prompts, one response each, sampled from π_θ (unfiltered: the data distribution)
  U-batch: B_U prompts x G responses with rewards and group advantages; all-equal groups dropped
  v = Δθ / lr from replaying one AdamW step on the U-batch's RL gradient (adam.replay_adamw)
  δH₁(η) = η ⟨∇H, v⟩ with per-sequence terms from one forward-mode JVP along v (and one along
  the gradient part: the momentum + weight-decay remainder is the difference)
  ΔH_true(η) = δH₁(η) + (SNIS(η) - its linearisation on the same samples) at θ ± ηv
  (delta_h_stats), plain SNIS kept as the baseline; intervals by bootstrap over E sequences
η is given relative to the checkpoint's learning rate: η = lr is the step training would take.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from entroflow import delta_h_stats as st
from entroflow.adam import AdamStep, replay_adamw
from entroflow.delta_h import (
    fit_loglog,
    functional_values,
    rl_loss,
    score_sequences,
    shifted,
)
from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.io import TokenTable, flatten
from entroflow.pipeline import generation_table
from entroflow.tangents import score_with_tangent
from entroflow.training.rewards import correctness_rewards, format_rewards, group_advantages

log = logging.getLogger(__name__)
MAXENT_STATE_FILE = "maxent_state.json"  # τ, β in a maxent_grpo checkpoint (training.trainer)
GROUND_TRUTH_METHOD = (
    "control variate: causal first order η⟨∇H, v⟩ (forward-mode JVP) + SNIS's remainder beyond "
    "its own linearisation on the same E-batch; 95% interval: normal, bootstrap over E sequences"
)
ACCUM = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class DeltaHSettings:
    e_prompts: int = 64
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
    if run.algorithm != "maxent_grpo":
        advantages = group_advantages(rewards, g, scale=(run.algorithm == "grpo"))
        return advantages, np.repeat(rewards.reshape(-1, g).std(1) > 0, g)
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


def _with_scores(table: TokenTable, scores) -> TokenTable:
    table.groups["tokens"]["entropy"], _ = flatten(
        [e.detach().float().cpu().numpy() for e in scores.entropy], np.float32
    )
    table.groups["tokens"]["logprob"], _ = flatten(
        [lp.detach().float().cpu().numpy() for lp in scores.logprob], np.float32
    )
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

    e_prompts = [prompt_ids[e_rows[g.prompt_row]] for g in e_gens]
    e_responses = [g.token_ids for g in e_gens]

    def score_e_batch():  # the same sequences and settings at θ and at every shifted θ ± ηv
        return score_sequences(
            model,
            e_prompts,
            e_responses,
            pad_token_id=pad,
            temperature=run.temperature,
            accum_dtype=accum,
        )

    # E-batch at θ: values and exact tangents along v and along the gradient part (forward AD).
    clock: dict[str, list[float]] = {}
    with torch.no_grad():
        e_scores = _timed(clock, "forward", score_e_batch)
    e_jvp = _timed(clock, "jvp", lambda: score_with_tangent(score_e_batch, model, v))
    e_jvp_grad = _timed(
        clock, "jvp", lambda: score_with_tangent(score_e_batch, model, step.gradient_part)
    )
    # Values from the plain forward, the pass every shifted θ ± ηv uses too (the JVP's primal
    # runs on SDPA's math backend and may differ in the last bits).
    arrays = st.TokenArrays.from_lists(
        [e.detach().double().cpu().numpy() for e in e_scores.entropy],
        [lp.detach().double().cpu().numpy() for lp in e_scores.logprob],
    )
    width = arrays.mask.shape[1]
    tangents = {"total": st.Tangent.from_lists(e_jvp.d_entropy, e_jvp.d_logprob, width)}
    tangents["gradient_part"] = st.Tangent.from_lists(
        e_jvp_grad.d_entropy, e_jvp_grad.d_logprob, width
    )
    tangents["remainder"] = st.Tangent(
        tangents["total"].d_entropy - tangents["gradient_part"].d_entropy,
        tangents["total"].d_logprob - tangents["gradient_part"].d_logprob,
    )
    n_e = len(e_gens)
    counts = st.resample_counts(n_e, settings.bootstrap, settings.seed)
    slopes = {
        k: st.first_order_slope(arrays, t, counts, settings.estimator, per_token)
        for k, t in tangents.items()
    }
    log.info(
        "first-order slope <∇H, v> = %.4g ± %.2g (gradient part %.4g, momentum+decay %.4g)",
        slopes["total"][0],
        np.std(slopes["total"][1:], ddof=1),
        slopes["gradient_part"][0],
        slopes["remainder"][0],
    )

    # The covariance predictor (Cui et al. 2025) on the U-batch, bootstrapped over its groups.
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
    group_counts = st.resample_counts(
        int(u_groups.max()) + 1, settings.bootstrap, settings.seed + 1
    )
    cov_per_token = st.covariance_predictor(
        [lp.sum() for lp in u_jvp.logprob],
        [len(lp) for lp in u_jvp.logprob],
        [d.sum() for d in u_jvp.d_logprob],
        advantages[kept],
        group_counts[:, u_groups],  # a group's count for each of its sequences
    )
    # Per-token entropy change; the sequence functional Σ_t H_t sums it over the E-batch's tokens.
    cov_scale = 1.0 if per_token else float(arrays.lengths.mean())

    # The η sweep: θ ± ηv on the same E-batch.
    etas = np.asarray(settings.eta_scale, dtype=np.float64) * step.lr
    a_old, d = arrays.values(settings.estimator), arrays.denominators(per_token)
    s_old = arrays.logprob.sum(1)
    t_v = tangents["total"]
    snis_linear = st.snis_slope(a_old, t_v.values(settings.estimator), t_v.score, d, counts)
    rows: dict[str, list] = {}
    per_eta: dict[str, list] = {
        "log_ratio": [],
        "h_new": [],
        "log_ratio_minus": [],
        "h_new_minus": [],
    }

    def add(key, value):
        rows.setdefault(key, []).append(value)

    with torch.no_grad():
        for eta in etas:
            reps = {}
            for sign, suffix in ((1.0, ""), (-1.0, "_minus")):
                with shifted(model, v, sign * eta):
                    new = _timed(clock, "sweep", score_e_batch)
                a_new, s_new, _ = functional_values(new, settings.estimator)
                per_eta["log_ratio" + suffix].append(s_new - s_old)
                per_eta["h_new" + suffix].append(a_new)
                snis = st.snis(a_old, a_new, s_new - s_old, d, counts)  # unclipped: unbiased
                reps["snis" + suffix] = st.snis(
                    a_old, a_new, s_new - s_old, d, counts, settings.clip
                )
                reps["nonlinearity" + suffix] = snis - sign * eta * snis_linear
                add("ess" + suffix, st.ess(s_new - s_old))
                add("clip_fraction" + suffix, st.clipped_fraction(s_new - s_old, settings.clip))
            first = eta * slopes["total"]
            truth = first + reps["nonlinearity"]
            truth_minus = -first + reps["nonlinearity_minus"]
            relative = -reps["nonlinearity"] / truth  # (δH₁ - ΔH) / ΔH on shared samples
            cis = {
                "delta_h_true": st.interval(truth),
                "delta_h_true_sym": st.interval((truth - truth_minus) / 2),
                "delta_h_snis": st.interval(reps["snis"]),
                "delta_h_snis_minus": st.interval(reps["snis_minus"]),
                "delta_h_first_order": st.interval(first),
                "delta_h_first_order_gradient_part": st.interval(eta * slopes["gradient_part"]),
                "delta_h_first_order_remainder": st.interval(eta * slopes["remainder"]),
                "delta_h_cov": st.interval(eta * cov_scale * cov_per_token),
                "nonlinearity": st.interval(reps["nonlinearity"]),
            }
            for key, (est, se, lo, hi) in cis.items():
                add(key, est)
                add(key + "_ci", (lo, hi))
                add(key + "_stderr", se)
            # The verdict needs ΔH's sign: undecided while ΔH's own interval holds zero.
            _, _, t_lo, t_hi = cis["delta_h_true"]
            rel = np.quantile(relative[1:], [0.025, 0.975]) if t_lo * t_hi > 0 else [np.nan] * 2
            add("relative_error", float(relative[0]))
            add("relative_error_ci", tuple(float(x) for x in rel))
            add("verdict", st.verdict(*rel))
            log.info(
                "eta %.3g: ΔH %+.4g [%+.4g, %+.4g] (SNIS %+.4g ± %.2g), δH₁ %+.4g ± %.2g, "
                "nonlinearity %+.3g ± %.2g, cov %+.3g, δH₁ relative error %+.2f [%+.2f, %+.2f]: "
                "%s; ESS %.1f/%d",
                eta,
                cis["delta_h_true"][0],
                t_lo,
                t_hi,
                cis["delta_h_snis"][0],
                cis["delta_h_snis"][1],
                cis["delta_h_first_order"][0],
                cis["delta_h_first_order"][1],
                cis["nonlinearity"][0],
                cis["nonlinearity"][1],
                cis["delta_h_cov"][0],
                relative[0],
                rel[0],
                rel[1],
                rows["verdict"][-1],
                rows["ess"][-1],
                n_e,
            )
    est = {k: np.asarray(val) for k, val in rows.items()}
    est["verdict"] = est["verdict"].astype(object)
    est["stderr"] = est["delta_h_true_stderr"]
    est["delta_h_true_minus"] = est["delta_h_true"] - 2 * est["delta_h_true_sym"]
    est.update({k: np.asarray(val) for k, val in per_eta.items()})  # (η, N_E) for re-analysis
    est["eta"] = etas
    at_lr = int(np.argmin(np.abs(etas / step.lr - 1.0)))
    fit_slope, r2 = fit_loglog(etas, est["delta_h_true"])

    # Cost in forward passes over the E-batch (sampling excluded): the wall time of every pass
    # over the median plain forward (robust to a busy machine), and the count of passes.
    unit = float(np.median(clock["forward"] + clock["sweep"]))
    forward_equivalents = sum(map(sum, clock.values())) / unit
    log.info(
        "cost: %.1f forward-pass equivalents over the E-batch (%d forwards, 2 JVPs at %.1f each); "
        "verdict at η = lr: %s",
        forward_equivalents,
        1 + 2 * len(etas),
        np.mean(clock["jvp"]) / unit,
        est["verdict"][at_lr],
    )

    e_table = _with_scores(
        batch_table(problems, prompt_ids, e_rows, e_gens, tokenizer, {}), e_scores
    )
    for key, tangent in (("", e_jvp), ("_gradient_part", e_jvp_grad)):
        e_table.groups["tokens"]["d_entropy" + key], _ = flatten(tangent.d_entropy, np.float64)
        e_table.groups["tokens"]["d_logprob" + key], _ = flatten(tangent.d_logprob, np.float64)
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
        "entropy": float(a_old.sum() / d.sum()),
        "slope_total": float(slopes["total"][0]),
        "slope_gradient_part": float(slopes["gradient_part"][0]),
        "slope_remainder": float(slopes["remainder"][0]),
        "loglog_slope": fit_slope,
        "loglog_r2": r2,
        "verdict_at_lr": str(est["verdict"][at_lr]),
        "ground_truth_method": GROUND_TRUTH_METHOD,
        "forward_equivalents": forward_equivalents,
        "e_responses": n_e,
        "u_responses_kept": int(kept.sum()),
        "u_responses": len(u_gens),
        "seconds": time.perf_counter() - t0,
    }
    return TokenTable(groups=groups), summary
