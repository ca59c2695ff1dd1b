"""Per-step entropy traces and the step probe, as one TrainerCallback.

The step probe predicts, to first order, how one optimizer step changes the mean entropy of the
step's own rollout tokens, and measures the change (not the ΔH stage's δH₁ or ΔH, which are
about the policy's entropy at a checkpoint; not the Fisher kernel's identity).

A plain `TrainerCallback` on an `EntroflowGRPOTrainer` (`EntropyMonitor.attach(trainer, ...)`
adds it): the trainer hands it each step's rollouts (prompt/completion ids, rewards, advantages)
through `on_rollout`, then

- before the optimizer step: exact per-token entropy H_t of every rollout token at the current
  (sampling) parameters θ0, with one teacher-forced pass through our scorer; with the probe on,
  that pass keeps autograd and gives g = ∇_θ H̄, H̄ = mean over rollout tokens of H_t;
- after the optimizer step: Δθ = θ1 - θ0 (the real update, momentum and weight decay included),
  the predicted change ⟨g, Δθ⟩ (`probe_predicted`) and the realised change H̄(θ1) - H̄(θ0)
  on the same tokens (`probe_realised`);
- at step end: the trace file and manifest line, and the probe's values in the trainer's logs
  under the same names, with the covariance predictor of Cui et al. (2025) beside the
  prediction (`probe_covariance`).

H̄ is the mean entropy along the fixed rollout prefixes, so predicted and realised values
measure the same quantity; how the *policy's* entropy changes (including which sequences get
sampled) is the per-checkpoint ΔH stage's job.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from transformers import TrainerCallback

from entroflow.estimators.delta_h_stats import covariance_predictor
from entroflow.io import TokenTable, flatten, str_array, vocab_group
from entroflow.lm.scoring import batch_scores, token_budget_batches
from entroflow.training.rollout import Rollout
from entroflow.training.traces import (
    PROBE_COVARIANCE,
    PROBE_PREDICTED,
    PROBE_REALISED,
    TraceWriter,
)

log = logging.getLogger(__name__)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class EntropyMonitor(TrainerCallback):
    def __init__(
        self,
        tokenizer,
        trace_dir: str | None = None,
        write_every: int = 1,
        probe: bool = True,
        temperature: float = 1.0,
        max_tokens_per_batch: int = 8192,
        num_generations: int = 1,
    ):
        self.tokenizer = tokenizer
        self.writer = TraceWriter(trace_dir) if trace_dir else None
        self.write_every = write_every
        self.probe = probe
        self.temperature = temperature
        self.max_tokens_per_batch = max_tokens_per_batch
        self.num_generations = num_generations
        self.trainer = None
        self.rollout: Rollout | None = None
        self._reset_step()

    # -- wiring -------------------------------------------------------------------------------
    @classmethod
    def attach(cls, trainer, **kwargs) -> EntropyMonitor:
        """A monitor with `trainer`'s tokenizer, temperature and group size, added as its callback.

        `trainer` must be an `EntroflowGRPOTrainer` (training.trainer): it hands each training
        batch's rollout to `on_rollout`.
        """
        from entroflow.training.trainer import EntroflowGRPOTrainer

        if not isinstance(trainer, EntroflowGRPOTrainer):
            raise TypeError(
                f"{type(trainer).__name__} does not hand rollouts to callbacks: use "
                "entroflow.training.trainer.EntroflowGRPOTrainer (a GRPOTrainer subclass)"
            )
        monitor = cls(
            trainer.processing_class,
            temperature=trainer.args.temperature,
            num_generations=trainer.num_generations,
            **kwargs,
        )
        trainer.add_callback(monitor)
        return monitor

    def on_rollout(self, trainer, rollout: Rollout) -> None:
        """Called by EntroflowGRPOTrainer with each training batch's rollout."""
        self.trainer = trainer
        self.rollout = rollout

    def _reset_step(self) -> None:
        self.entropy = None  # list of np arrays per completion
        self.logprob = None
        self.metrics: dict[str, float] = {}
        self._theta0 = None
        self._grad = None
        self._h0 = None
        self._probe_seconds = 0.0

    # -- scoring ------------------------------------------------------------------------------
    def _score(self, model, with_grad: bool):
        """Per-token entropy/log-prob of the rollout; with grad, also ∇ of the mean entropy."""
        r = self.rollout
        keep = [i for i, c in enumerate(r.completion_ids) if c]
        total = sum(len(r.completion_ids[i]) for i in keep)
        params = [p for _, p in trainable_parameters(model)]
        grads = [torch.zeros_like(p) for p in params] if with_grad else None
        entropy = [np.zeros(0, np.float32) for _ in r.completion_ids]
        logprob = [np.zeros(0, np.float32) for _ in r.completion_ids]
        lengths = [len(r.prompt_ids[i]) + len(r.completion_ids[i]) for i in keep]
        h_sum = 0.0
        for batch in token_budget_batches(lengths, self.max_tokens_per_batch):
            idx = [keep[j] for j in batch]
            with torch.set_grad_enabled(with_grad):
                h, lp = batch_scores(
                    model,
                    [r.prompt_ids[i] for i in idx],
                    [r.completion_ids[i] for i in idx],
                    pad_token_id=self.tokenizer.pad_token_id,
                    temperature=self.temperature,
                )
                if with_grad:
                    for g, dg in zip(
                        grads,
                        torch.autograd.grad(h.sum() / total, params, allow_unused=True),
                        strict=True,
                    ):
                        if dg is not None:
                            g += dg
            h_np, lp_np = h.detach().float().cpu().numpy(), lp.detach().float().cpu().numpy()
            h_sum += float(h_np.astype(np.float64).sum())
            offset = 0
            for i in idx:
                n = len(r.completion_ids[i])
                entropy[i], logprob[i] = h_np[offset : offset + n], lp_np[offset : offset + n]
                offset += n
        return entropy, logprob, h_sum / max(total, 1), grads

    # -- callback events ----------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.rollout is None:
            return
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout in the measurement
        self.entropy, self.logprob, self._h0, self._grad = self._score(model, with_grad=self.probe)
        if self.probe:
            self._theta0 = [p.detach().clone() for _, p in trainable_parameters(model)]
        model.train(was_training)
        self._probe_seconds += time.perf_counter() - t0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.rollout is None or not self.probe or self._theta0 is None:
            return
        t0 = time.perf_counter()
        params = [p for _, p in trainable_parameters(model)]
        with torch.no_grad():
            predicted = sum(
                float((g.double() * (p.detach().double() - p0.double())).sum())
                for g, p, p0 in zip(self._grad, params, self._theta0, strict=True)
            )
            step_norm = float(
                torch.sqrt(
                    sum(
                        ((p.detach() - p0).double() ** 2).sum()
                        for p, p0 in zip(params, self._theta0, strict=True)
                    )
                )
            )
        was_training = model.training
        model.eval()
        _, logprob1, h1, _ = self._score(model, with_grad=False)
        model.train(was_training)
        self.metrics.update(
            {
                PROBE_PREDICTED: predicted,
                PROBE_COVARIANCE: self._covariance_prediction(logprob1),
                PROBE_REALISED: h1 - self._h0,
                "probe_mean_entropy_before": self._h0,
                "probe_update_norm": step_norm,
            }
        )
        self._theta0 = self._grad = None
        self._probe_seconds += time.perf_counter() - t0

    def _covariance_prediction(self, logprob_after) -> float:
        """Cui et al.'s -κ Cov(log π, A) for the mean token entropy, κ from the realised change
        of the rollout tokens' log-probs over this step (delta_h_stats.covariance_predictor)."""
        r = self.rollout
        keep = [i for i, c in enumerate(r.completion_ids) if c]
        if not keep:
            return float("nan")
        before = [self.logprob[i].astype(np.float64) for i in keep]
        after = [logprob_after[i].astype(np.float64) for i in keep]
        value = covariance_predictor(
            [b.sum() for b in before],
            [len(b) for b in before],
            [(a - b).sum() for a, b in zip(after, before, strict=True)],
            np.asarray(r.advantages, dtype=np.float64)[keep],
            np.ones((1, len(keep))),
        )
        return float(value[0])

    def on_step_end(self, args, state, control, **kwargs):
        if self.rollout is None or self.entropy is None:
            return
        r = self.rollout
        self.metrics["probe_seconds"] = self._probe_seconds
        if self.trainer is not None:
            self.trainer.record_metrics(self.metrics)
        if self.writer is not None and state.global_step % self.write_every == 0:
            extra = {
                "reward_mean": float(r.rewards.mean()),
                "accuracy": float(r.correct.mean()),
                **self.metrics,  # the same names as in the trainer's logs
            }
            self.writer.write(state.global_step, self.trace_table(state.global_step), extra)
        self.rollout = None
        self._reset_step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.write_summary({"temperature": self.temperature})

    # -- trace file ---------------------------------------------------------------------------
    def trace_table(self, step: int) -> TokenTable:
        r = self.rollout
        eos = self.tokenizer.eos_token_id
        first = np.flatnonzero(np.r_[True, r.group[1:] != r.group[:-1]])  # one prompt row per group
        p_flat, p_off = flatten([r.prompt_ids[i] for i in first], np.int32)
        t_flat, t_off = flatten(r.completion_ids, np.int32)
        entropy, _ = flatten(self.entropy, np.float32)
        logprob, _ = flatten(self.logprob, np.float32)
        texts = self.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
        n = len(r.completion_ids)
        table = TokenTable(
            groups={
                "prompts": {
                    "text": str_array(r.prompt_text[i] for i in first),
                    "answer": str_array(r.answers[i] for i in first),
                    "offsets": p_off,
                    "token_ids": p_flat,
                },
                "responses": {
                    "offsets": t_off,
                    "prompt_index": np.searchsorted(r.group[first], r.group).astype(np.int32),
                    "sample_index": (np.arange(n) % max(self.num_generations, 1)).astype(np.int32),
                    "finish_reason": str_array(
                        "stop" if c and c[-1] == eos else "length" for c in r.completion_ids
                    ),
                    "correct": r.correct,
                    "text": str_array(texts),
                    "reward": r.rewards,
                    "advantage": r.advantages,
                    "group": r.group,
                },
                "tokens": {
                    "token_id": t_flat,
                    "entropy": entropy,
                    "logprob": logprob,
                    "engine_logprob": np.full(len(t_flat), np.nan, dtype=np.float32),
                },
            },
            attrs={"step": step, "temperature": self.temperature, "source": "training rollouts"},
        )
        table.groups["vocab"] = vocab_group(t_flat, self.tokenizer)
        return table
