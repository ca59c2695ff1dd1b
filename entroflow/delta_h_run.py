"""The per-checkpoint ΔH stage: batches, the replayed update direction, the η sweep, the file.

For a checkpoint θ with AdamW state:
  E-batch: B_E prompts, one response each, sampled from π_θ (unfiltered: the data distribution)
  U-batch: B_U prompts x G responses with rewards and group advantages; all-equal groups dropped
  v = Δθ / lr from replaying one AdamW step on the U-batch's RL gradient (adam.replay_adamw)
  ΔH_true(η) by SNIS on the E-batch at θ ± η v;  δH₁(η) = η ⟨∇H, v⟩ from one backward
η is given relative to the checkpoint's learning rate: η = lr is the step training would take.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from entroflow.adam import AdamStep, dot, replay_adamw
from entroflow.delta_h import (
    entropy_gradient,
    fit_loglog,
    functional_values,
    rl_loss,
    score_sequences,
    shifted,
    snis_delta,
)
from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.io import TokenTable, flatten
from entroflow.pipeline import generation_table
from entroflow.training.rewards import correctness_rewards, format_rewards, group_advantages

log = logging.getLogger(__name__)
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
    if run.algorithm == "maxent_grpo":
        raise NotImplementedError(
            "ΔH replay for maxent_grpo runs (listwise advantages) is not implemented yet"
        )
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

    # U-batch: rewards, advantages, drop groups whose rewards are all equal (no gradient).
    u_texts = tokenizer.batch_decode(
        [g.token_ids.tolist() for g in u_gens], skip_special_tokens=True
    )
    answers = [problems["answer"].iloc[u_rows[g.prompt_row]] for g in u_gens]
    correct = np.asarray(correctness_rewards(u_texts, answers))
    rewards = correct + run.format_reward * np.asarray(format_rewards(u_texts))
    advantages = group_advantages(rewards, run.group_size, scale=(run.algorithm == "grpo"))
    kept = np.repeat(rewards.reshape(-1, run.group_size).std(1) > 0, run.group_size)
    u_keep = [g for g, k in zip(u_gens, kept, strict=True) if k]
    if not u_keep:
        raise ValueError("every U-batch group has equal rewards: no RL gradient (raise u_prompts)")

    # The update direction: replay one AdamW step on the U-batch's RL gradient.
    u_prompts = [prompt_ids[u_rows[g.prompt_row]] for g in u_keep]
    u_responses = [g.token_ids for g in u_keep]
    step = replay_step(model, u_prompts, u_responses, advantages[kept], run, adam_state, pad, accum)
    v = step.direction

    # E-batch at θ (with grad): values and the first-order slope ⟨∇H, v⟩.
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

    e_scores = score_e_batch()
    h_old, s_old, lengths = functional_values(e_scores, settings.estimator)
    base = np.ones(len(e_gens))
    grad_h = entropy_gradient(
        model, e_scores, base, settings.estimator, per_token, leave_one_out=True
    )
    slope = {
        "total": dot(grad_h, v),
        "gradient_part": dot(grad_h, step.gradient_part),
        "remainder": dot(grad_h, step.remainder),
    }
    log.info(
        "first-order slope <∇H, v> = %.4g (gradient part %.4g, momentum+decay %.4g)",
        *slope.values(),
    )

    # The η sweep: SNIS at θ ± η v.
    etas = np.asarray(settings.eta_scale, dtype=np.float64) * step.lr
    rows = {k: [] for k in ("delta_h_true", "delta_h_true_minus", "stderr", "ess", "clip_fraction")}
    with torch.no_grad():
        for eta in etas:
            results = []
            for sign in (1.0, -1.0):
                with shifted(model, v, sign * eta):
                    new = score_e_batch()
                h_new, s_new, _ = functional_values(new, settings.estimator)
                results.append(
                    snis_delta(
                        h_old,
                        h_new,
                        s_new - s_old,
                        lengths,
                        base,
                        per_token,
                        settings.clip,
                        settings.bootstrap,
                        settings.seed,
                    )
                )
            plus, minus = results
            for key, value in (
                ("delta_h_true", plus.delta),
                ("delta_h_true_minus", minus.delta),
                ("stderr", plus.stderr),
                ("ess", plus.ess),
                ("clip_fraction", plus.clip_fraction),
            ):
                rows[key].append(value)
            log.info(
                "eta %.3g: ΔH %+.4g ± %.2g (−η: %+.4g), δH₁ %+.4g, ESS %.1f/%d",
                eta,
                plus.delta,
                plus.stderr,
                minus.delta,
                eta * slope["total"],
                plus.ess,
                len(base),
            )
    est = {k: np.asarray(val) for k, val in rows.items()}
    est["delta_h_true_sym"] = (est["delta_h_true"] - est["delta_h_true_minus"]) / 2
    est["delta_h_first_order"] = etas * slope["total"]
    est["delta_h_first_order_gradient_part"] = etas * slope["gradient_part"]
    est["delta_h_first_order_remainder"] = etas * slope["remainder"]
    est["eta"] = etas
    fit_slope, r2 = fit_loglog(etas, est["delta_h_true"])

    e_table = _with_scores(
        batch_table(problems, prompt_ids, e_rows, e_gens, tokenizer, {}), e_scores
    )
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
        "entropy": float(np.mean(h_old) if not per_token else h_old.sum() / lengths.sum()),
        "slope_total": slope["total"],
        "slope_gradient_part": slope["gradient_part"],
        "slope_remainder": slope["remainder"],
        "loglog_slope": fit_slope,
        "loglog_r2": r2,
        "e_responses": len(e_gens),
        "u_responses_kept": int(kept.sum()),
        "u_responses": len(u_gens),
        "seconds": time.perf_counter() - t0,
    }
    return TokenTable(groups=groups), summary
