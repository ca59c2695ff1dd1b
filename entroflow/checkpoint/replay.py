"""Sampling a checkpoint's batches and replaying its update, as the training run would.

U-batch: B_U prompts x G responses with the run's rewards and advantages (all-equal groups
dropped where the algorithm drops them); the update direction v = Δθ / lr replays one AdamW
step on the U-batch's RL gradient (estimators.adam). The E-batch is sampled here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entroflow.checkpoint.settings import RunShape
from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.estimators.adam import AdamStep, replay_adamw
from entroflow.estimators.delta_h import score_sequences
from entroflow.io import TokenTable
from entroflow.tokens.pipeline import generation_table
from entroflow.training.algorithms import algorithm, rl_loss
from entroflow.training.rewards import correctness_rewards, format_rewards
from entroflow.training.trainer import MAXENT_STATE_FILE


def read_maxent_state(checkpoint: str | Path) -> dict:
    """τ, β of a maxent_grpo checkpoint's controller ({} for the other algorithms)."""
    path = Path(checkpoint) / MAXENT_STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


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


@dataclass
class UBatch:
    """The U-batch as the trainer would see it: every response, and those with an RL gradient."""

    rows: np.ndarray  # (B_U,) problem rows
    gens: list  # (B_U·G,) sampled responses
    correct: np.ndarray  # (B_U·G,) 1/0
    rewards: np.ndarray  # (B_U·G,) correctness + format_reward · format
    advantages: np.ndarray  # (B_U·G,)
    kept: np.ndarray  # (B_U·G,) bool: sequences with an RL gradient
    prompts: list  # token ids of the kept sequences' prompts
    responses: list  # token ids of the kept sequences

    def table(self, problems, prompt_ids, tokenizer) -> TokenTable:
        extra = {
            "reward": self.rewards.astype(np.float32),
            "advantage": self.advantages.astype(np.float32),
            "kept": self.kept.astype(np.int8),
            "correct": self.correct.astype(np.int8),
        }
        return batch_table(problems, prompt_ids, self.rows, self.gens, tokenizer, extra)

    @property
    def kept_gens(self) -> list:
        return [g for g, k in zip(self.gens, self.kept, strict=True) if k]


def draw_u_batch(
    model, tokenizer, problems: pd.DataFrame, prompt_ids, rows, run: RunShape, seed: int, accum
) -> UBatch:
    """Sample group_size responses per prompt, reward them and compute the run's advantages."""
    gens = sample_batch(model, tokenizer, prompt_ids, rows, run.group_size, run, seed)
    texts = tokenizer.batch_decode([g.token_ids.tolist() for g in gens], skip_special_tokens=True)
    answers = [problems["answer"].iloc[rows[g.prompt_row]] for g in gens]
    correct = np.asarray(correctness_rewards(texts, answers))
    rewards = correct + run.format_reward * np.asarray(format_rewards(texts))
    prompts = [prompt_ids[rows[g.prompt_row]] for g in gens]
    pad = tokenizer.pad_token_id
    responses = [g.token_ids for g in gens]
    advantages, kept = u_batch_advantages(model, prompts, responses, rewards, run, pad, accum)
    if not kept.any():
        raise ValueError("every U-batch group has equal rewards: no RL gradient (raise u_prompts)")
    keep = np.flatnonzero(kept)
    return UBatch(
        rows=rows,
        gens=gens,
        correct=correct,
        rewards=rewards,
        advantages=advantages,
        kept=kept,
        prompts=[prompts[i] for i in keep],
        responses=[responses[i] for i in keep],
    )


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
