"""The `hf` engine: batched sampling with transformers' `generate` (CPU and GPU).

The warpers (temperature, top-k, top-p) are applied by our own processor list and the model's
generation defaults are switched off, so a model's generation_config.json (Qwen3 ships top_k=20)
cannot silently change the sampling distribution. A last processor records the engine's log-prob
of each sampled token under the final (truncated) distribution, holding one [B, V] step at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from entroflow.engines.base import ForkingTemperature, Generation, Progress, SamplingParams
from entroflow.entropy import entropy_and_logprob
from entroflow.scoring import left_pad

log = logging.getLogger(__name__)


class _SampledLogprobRecorder(LogitsProcessor):
    """log p(sampled token) under the processed scores: step t's token is seen at step t+1."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # (B, V) log-probs of the last step
        self.steps: list[torch.Tensor] = []  # each (B,)

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.previous.gather(1, tokens[:, None]).squeeze(1).cpu())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(B, steps) float32, given the tokens sampled at the last step."""
        if self.previous is not None:
            self._take(last_tokens)
        self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)


class ForkingTemperatureWarper(LogitsProcessor):
    """Per-row temperature: t_high where the row's entropy is above the threshold, else t_low.

    The entropy is exact over the full vocabulary (row-chunked, fp32), under softmax(logits /
    base_temperature), i.e. the quantity the threshold was measured as.
    """

    def __init__(self, forking: ForkingTemperature):
        self.forking = forking

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        f = self.forking
        entropy, _ = entropy_and_logprob(scores, None, temperature=f.base_temperature)  # (B,)
        high = torch.tensor(f.t_high, dtype=scores.dtype, device=scores.device)
        low = torch.tensor(f.t_low, dtype=scores.dtype, device=scores.device)
        temperature = torch.where(entropy.to(scores.device) > f.threshold, high, low)  # (B,)
        return scores / temperature[:, None]


def batch_seed(seed: int, first_sequence: int) -> int:
    """Each batch reseeds from (seed, its first sequence), so a rerun of one batch is reproducible."""
    return (seed * 1_000_003 + first_sequence) % (2**63)


class HFEngine:
    def __init__(
        self, model, tokenizer, batch_size: int = 32, eos_token_ids: Sequence[int] | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = eos_token_ids or model.generation_config.eos_token_id or tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.pad_token_id = tokenizer.pad_token_id

    def _processors(self, params: SamplingParams, recorder) -> LogitsProcessorList:
        procs = []
        if params.forking is not None:
            procs.append(ForkingTemperatureWarper(params.forking))
        elif params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=params.top_p))
        return LogitsProcessorList([*procs, recorder])

    def _split(self, new_tokens: np.ndarray, logprobs: np.ndarray, max_new: int):
        """Cut one row at its first EOS (kept as a generated token) or at max_new_tokens."""
        hits = np.flatnonzero(np.isin(new_tokens, self.eos_token_ids))
        if len(hits):
            end = int(hits[0]) + 1
            return new_tokens[:end], logprobs[:end], "stop"
        return new_tokens[:max_new], logprobs[:max_new], "length"

    @torch.inference_mode()
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Generation]:
        device = next(self.model.parameters()).device
        jobs = [
            (row, s)
            for row in range(len(prompt_token_ids))
            for s in range(params.samples_per_prompt)
        ]
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        results: list[Generation] = []
        t0 = time.perf_counter()
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            ids, mask, _ = left_pad([prompt_token_ids[row] for row, _ in batch], self.pad_token_id)
            torch.manual_seed(batch_seed(params.seed, start))
            recorder = _SampledLogprobRecorder()
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=self._processors(params, recorder),
            )
            new = out[:, ids.shape[1] :]
            logprobs = (
                recorder.finish(new[:, -1]).numpy() if new.shape[1] else np.zeros((len(batch), 0))
            )
            new = new.cpu().numpy()
            for b, (row, sample) in enumerate(batch):
                tokens, lps, reason = self._split(new[b], logprobs[b], params.max_new_tokens)
                results.append(
                    Generation(row, sample, tokens.astype(np.int32), reason, lps.astype(np.float32))
                )
            if progress is not None:
                done_prompts = batch[-1][0] + (
                    1 if batch[-1][1] == params.samples_per_prompt - 1 else 0
                )
                progress(done_prompts, len(prompt_token_ids), time.perf_counter() - t0)
        return results
