"""Per-step entropy traces and the step probe, as one TrainerCallback.

The step probe predicts, to first order, how one optimizer step changes the mean entropy of the
step's own rollout tokens, and measures the change (not the ΔH stage's δH₁ or ΔH, which are
about the policy's entropy at a checkpoint; not the Fisher kernel's identity).

A plain `TrainerCallback` on an `EntroflowGRPOTrainer` (`EntropyMonitor.attach(trainer, ...)`
adds it): the trainer hands it each step's rollouts (prompt/completion ids, rewards, advantages)
through `on_rollout`, then

- before the optimizer step: exact per-token entropy H_t of every rollout token at the current
  (sampling) parameters θ0, with one teacher-forced pass through our scorer (the trace; the
  same values whether the probe is on or off); on a probe step, a copy of the trainable θ0,
  and when the probe covers all rollouts that pass keeps autograd and one backward gives
  g = ∇_θ H̄(θ0);
- after the optimizer step, on a probe step: Δθ = θ1 - θ0 (the real update, momentum and weight
  decay included); the predicted change ⟨∇H̄(θ0), Δθ⟩ (`probe_predicted`): ⟨g, Δθ⟩, or on a
  sample of rollouts one forward-mode pass at θ0 with tangent Δθ (per rollout ⟨∇H_i, Δθ⟩, hence
  standard errors; no backward); and one no-grad pass at θ1 for the realised change
  H̄(θ1) - H̄(θ0) on the same tokens (`probe_realised`; H̄(θ0) from the trace pass);
- at step end: the trace file and manifest line, and the probe's values in the trainer's logs
  under the same names, with the covariance predictor of Cui et al. (2025) beside the
  prediction (`probe_covariance`), and the tokens' entropy mean and percentiles
  (`trace_entropy/p50`, ...). Through the trainer's `log` they reach TRL's integrations
  (`report_to`: TensorBoard, W&B) with TRL's own metrics.

H̄ is the token-weighted mean entropy along the fixed rollout prefixes, so predicted and
realised values measure the same quantity; how the *policy's* entropy changes (including which
sequences get sampled) is the per-checkpoint ΔH stage's job.

Cost and options: the probe costs a backward and one forward over the rollouts per probe step
(on the demo's CPU, forward mode measured dearer than the backward, so it is used only where
its per-rollout values are needed). `probe_sequences = m` runs it on a simple random sample of
m of the step's N non-empty rollouts: the values are then ratio estimates of the whole batch's,
with their standard errors (`probe_predicted_se`, `probe_realised_se`, finite-population
corrected; 0 when m = N). `probe_every = k` probes steps k, 2k, ... only (the others log no
probe values). Measured overhead: docs/benchmarks.md, "Step probe".
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
from entroflow.lm.tangents import tangent_along
from entroflow.training.rollout import Rollout
from entroflow.training.traces import (
    PROBE_COVARIANCE,
    PROBE_PREDICTED,
    PROBE_REALISED,
    TraceWriter,
    logged_stats,
    step_stats,
)

log = logging.getLogger(__name__)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def ratio_estimate(y: np.ndarray, n: np.ndarray, population: int) -> tuple[float, float]:
    """Σy / Σn over a simple random sample of `len(y)` of `population` units (sequences with
    token counts n) and its standard error (the ratio estimator's, finite-population corrected:
    0 when the sample is the population, NaN below two units)."""
    y, n = np.asarray(y, np.float64), np.asarray(n, np.float64)
    m = len(y)
    if m == 0 or n.sum() == 0:
        return float("nan"), float("nan")
    ratio = float(y.sum() / n.sum())
    if m == population:
        return ratio, 0.0
    if m < 2:
        return ratio, float("nan")
    residual = y - ratio * n
    var = (1 - m / population) * residual.var(ddof=1) / (m * n.mean() ** 2)
    return ratio, float(np.sqrt(var))


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
        probe_every: int = 1,
        probe_sequences: int = 0,
        seed: int = 0,
        accum_dtype: torch.dtype = torch.float32,  # the run's precision.entropy_dtype
    ):
        if probe_every < 1 or probe_sequences < 0:
            raise ValueError(
                f"probe_every must be >= 1 and probe_sequences >= 0 (0: all), got "
                f"{probe_every} and {probe_sequences}"
            )
        self.tokenizer = tokenizer
        self.writer = TraceWriter(trace_dir) if trace_dir else None
        self.write_every = write_every
        self.probe = probe
        self.probe_every = probe_every
        self.probe_sequences = probe_sequences
        self.seed = seed
        self.temperature = temperature
        self.max_tokens_per_batch = max_tokens_per_batch
        self.num_generations = num_generations
        self.accum_dtype = accum_dtype
        self.trainer = None
        self.rollout: Rollout | None = None
        self._reset_step()

    # -- wiring -------------------------------------------------------------------------------
    @classmethod
    def attach(cls, trainer, **kwargs) -> EntropyMonitor:
        """A monitor with `trainer`'s tokenizer, temperature, group size and seed, added as its
        callback.

        `trainer` must be an `EntroflowGRPOTrainer` (training.trainer): it hands each training
        batch's rollout to `on_rollout`.
        """
        from entroflow.training.trainer import EntroflowGRPOTrainer

        if not isinstance(trainer, EntroflowGRPOTrainer):
            raise TypeError(
                f"{type(trainer).__name__} does not hand rollouts to callbacks: use "
                "entroflow.training.trainer.EntroflowGRPOTrainer (a GRPOTrainer subclass)"
            )
        kwargs.setdefault("seed", trainer.args.seed)
        monitor = cls(
            trainer.processing_class,
            temperature=trainer.args.temperature,
            num_generations=trainer.num_generations,
            **kwargs,
        )
        trainer.add_callback(monitor)
        return monitor

    def on_rollout(self, trainer, rollout: Rollout) -> None:
        """Called by EntroflowGRPOTrainer with each training batch's rollout. Under several
        processes only the main one's: the trace and the probe cover its share of the step's
        rollouts (whole groups), the probe along the step's one (all-reduced) update."""
        if not trainer.accelerator.is_main_process:
            return
        self.trainer = trainer
        self.rollout = rollout

    def _reset_step(self) -> None:
        self.entropy = None  # list of np arrays per completion
        self.logprob = None
        self.metrics: dict[str, float] = {}
        self._theta0 = None
        self._grad = None
        self._probed: list[int] = []
        self._probe_seconds = 0.0

    def probe_step(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based, as logged) is probed."""
        return self.probe and step % self.probe_every == 0

    def probe_rollouts(self, step: int) -> list[int]:
        """The rollouts the probe runs on: every non-empty one, or a simple random sample of
        `probe_sequences` of them (seeded by the run's seed and the step)."""
        keep = [i for i, c in enumerate(self.rollout.completion_ids) if c]
        m = self.probe_sequences
        if m == 0 or m >= len(keep):
            return keep
        rng = np.random.default_rng([self.seed, step])
        return sorted(rng.choice(keep, size=m, replace=False).tolist())

    # -- scoring ------------------------------------------------------------------------------
    def _batches(self, idx: list[int]) -> list[list[int]]:
        r = self.rollout
        lengths = [len(r.prompt_ids[i]) + len(r.completion_ids[i]) for i in idx]
        return [
            [idx[j] for j in b] for b in token_budget_batches(lengths, self.max_tokens_per_batch)
        ]

    def _batch_scores(self, idx: list[int], model, **head):
        r = self.rollout
        return batch_scores(
            model,
            [r.prompt_ids[i] for i in idx],
            [r.completion_ids[i] for i in idx],
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.temperature,
            accum_dtype=self.accum_dtype,
            **head,
        )

    def _split(self, values: np.ndarray, idx: list[int]) -> dict[int, np.ndarray]:
        out, offset = {}, 0
        for i in idx:
            n = len(self.rollout.completion_ids[i])
            out[i] = values[offset : offset + n]
            offset += n
        return out

    def _score(self, model, idx: list[int], with_grad: bool = False):
        """Per-token entropy and log-prob (float32 numpy) of rollouts `idx`; with grad, also
        ∇_θ Σ_t H_t over their tokens (one backward per batch of the same pass)."""
        entropy, logprob = {}, {}
        params = [p for _, p in trainable_parameters(model)]
        grads = [torch.zeros_like(p) for p in params] if with_grad else None
        for batch in self._batches(idx):
            with torch.set_grad_enabled(with_grad):
                h, lp = self._batch_scores(batch, model)
                if with_grad:
                    for g, dg in zip(
                        grads, torch.autograd.grad(h.sum(), params, allow_unused=True), strict=True
                    ):
                        if dg is not None:
                            g += dg
            entropy.update(self._split(h.detach().float().cpu().numpy(), batch))
            logprob.update(self._split(lp.detach().float().cpu().numpy(), batch))
        return entropy, logprob, grads

    def _entropy_tangent_sums(self, model, idx: list[int], theta0, delta) -> dict[int, float]:
        """Σ_t ⟨∇H_t(θ0), Δθ⟩ of each rollout in `idx`: one forward-mode pass at θ0 along Δθ."""
        from torch.autograd import forward_ad

        sums = {}
        with torch.no_grad(), tangent_along(model, delta, at=theta0):
            for batch in self._batches(idx):
                h, _ = self._batch_scores(batch, model, head_method="chunked")
                tangent = forward_ad.unpack_dual(h).tangent
                values = np.zeros(len(h)) if tangent is None else tangent.double().cpu().numpy()
                sums.update({i: float(v.sum()) for i, v in self._split(values, batch).items()})
        return sums

    # -- callback events ----------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.rollout is None:
            return
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout in the measurement
        r = self.rollout
        keep = [i for i, c in enumerate(r.completion_ids) if c]
        step = state.global_step + 1  # the step this update will be logged as
        probing = self.probe_step(step)
        if probing:
            self._probed = self.probe_rollouts(step)
        # All rollouts probed: the trace pass keeps autograd and one backward gives ∇H̄(θ0)
        # (cheaper on CPU than forward mode); a sample: forward mode after the step instead,
        # which gives each rollout's own ⟨∇H_i, Δθ⟩ and so the standard errors.
        backward = probing and len(self._probed) == len(keep)
        entropy, logprob, self._grad = self._score(model, keep, with_grad=backward)
        empty = np.zeros(0, np.float32)
        self.entropy = [entropy.get(i, empty) for i in range(len(r.completion_ids))]
        self.logprob = [logprob.get(i, empty) for i in range(len(r.completion_ids))]
        if probing:
            self._theta0 = {n: p.detach().clone() for n, p in trainable_parameters(model)}
        model.train(was_training)
        self._probe_seconds += time.perf_counter() - t0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.rollout is None or self._theta0 is None:
            return
        t0 = time.perf_counter()
        theta0 = self._theta0
        with torch.no_grad():
            delta = {n: p.detach() - theta0[n] for n, p in trainable_parameters(model)}
            step_norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
        was_training = model.training
        model.eval()
        idx = self._probed
        if self._grad is None:
            tangent = self._entropy_tangent_sums(model, idx, theta0, delta)
        entropy1, logprob1, _ = self._score(model, idx)
        model.train(was_training)
        n = np.array([len(self.rollout.completion_ids[i]) for i in idx], dtype=np.float64)
        changes = [
            float((entropy1[i].astype(np.float64) - self.entropy[i].astype(np.float64)).sum())
            for i in idx
        ]
        population = sum(1 for c in self.rollout.completion_ids if c)
        if self._grad is None:
            predicted, predicted_se = ratio_estimate([tangent[i] for i in idx], n, population)
        else:
            dot = sum(
                float((g.double() * d.double()).sum())
                for g, d in zip(self._grad, delta.values(), strict=True)
            )
            predicted, predicted_se = dot / max(n.sum(), 1), 0.0
        realised, realised_se = ratio_estimate(changes, n, population)
        h0 = float(sum(self.entropy[i].astype(np.float64).sum() for i in idx) / max(n.sum(), 1))
        self.metrics.update(
            {
                PROBE_PREDICTED: predicted,
                PROBE_COVARIANCE: self._covariance_prediction(idx, logprob1),
                PROBE_REALISED: realised,
                "probe_predicted_se": predicted_se,
                "probe_realised_se": realised_se,
                "probe_sequences": len(idx),
                "probe_mean_entropy_before": h0,
                "probe_update_norm": step_norm,
            }
        )
        self._theta0 = self._grad = None
        self._probe_seconds += time.perf_counter() - t0

    def _covariance_prediction(self, idx: list[int], logprob_after: dict) -> float:
        """Cui et al.'s -κ Cov(log π, A) for the mean token entropy over the probe's rollouts,
        κ from the realised change of their tokens' log-probs over this step
        (delta_h_stats.covariance_predictor)."""
        if not idx:
            return float("nan")
        before = [self.logprob[i].astype(np.float64) for i in idx]
        after = [logprob_after[i].astype(np.float64) for i in idx]
        value = covariance_predictor(
            [b.sum() for b in before],
            [len(b) for b in before],
            [(a - b).sum() for a, b in zip(after, before, strict=True)],
            np.asarray(self.rollout.advantages, dtype=np.float64)[idx],
            np.ones((1, len(idx))),
        )
        return float(value[0])

    def on_step_end(self, args, state, control, **kwargs):
        if self.rollout is None or self.entropy is None:
            return
        r = self.rollout
        self.metrics["probe_seconds"] = self._probe_seconds
        if self.trainer is not None:  # logged with TRL's metrics, so the trackers get them too
            tokens = np.concatenate([np.zeros(0, np.float32), *self.entropy])
            self.trainer.record_metrics({**self.metrics, **logged_stats(step_stats(tokens))})
        if self.writer is not None and state.global_step % self.write_every == 0:
            extra = {
                "world_size": args.world_size,  # processes; this file holds the main one's share
                "reward_mean": float(r.rewards.mean()),
                "accuracy": float(r.correct.mean()),
                **r.metrics,  # the trainer's (MaxEnt-GRPO: τ, β, Δτ, Δβ), as in its logs
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
        # One prompt row per group (InfoSeed-GRPO: per group and seed, each variant's own prompt)
        seed = np.zeros_like(r.group) if r.seed is None else r.seed
        _, first, prompt_index = np.unique(
            np.c_[r.group, seed], axis=0, return_index=True, return_inverse=True
        )
        prompt_index = prompt_index.reshape(-1)  # numpy 2.0.0 returned it 2-D with `axis`
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
                    "prompt_index": prompt_index.astype(np.int32),
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
        if r.seed is not None:  # InfoSeed-GRPO: which prompt variant each response answered
            table.groups["responses"]["seed"] = r.seed
        table.groups["vocab"] = vocab_group(t_flat, self.tokenizer)
        return table
