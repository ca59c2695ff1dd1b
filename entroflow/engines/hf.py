"""The `hf` engine: batched sampling from a transformers model, two ways behind one interface.

- `generate` (the default on CPU): transformers' own loop, one batch at a time.
- `static` (the default on CUDA, `static_decode.py`): our decode loop with a static KV cache,
  CUDA graphs, prompts sorted by length into batches, and finished rows retired.

The warpers (temperature, top-k, top-p) are applied by our own processor list and the model's
generation defaults are switched off, so a model's generation_config.json (Qwen3 ships top_k=20)
cannot silently change the sampling distribution. A last processor records the engine's log-prob
of each sampled token under the final (truncated) distribution, holding one [B, V] step at a time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
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

from entroflow.engines.base import (
    ForkingTemperature,
    Generation,
    Progress,
    SamplingParams,
    sample_jobs,
)
from entroflow.engines.static_decode import StaticDecoder, make_sampler, supports_static_decode
from entroflow.lm.batching import left_pad
from entroflow.lm.entropy import entropy_and_logprob

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


class _EntropyRecorder(LogitsProcessor):
    """Full-vocabulary entropy of each step's raw logits under softmax(logits / T); first in the list."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []  # each (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(entropy_and_logprob(scores, None, temperature=self.temperature)[0])
        return scores

    def finish(self, rows: int) -> np.ndarray:
        """(B, steps) float32."""
        if not self.steps:
            return np.zeros((rows, 0), np.float32)
        return torch.stack(self.steps, dim=1).float().cpu().numpy()


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


DECODERS = ("auto", "generate", "static")


class HFEngine:
    """`decoder`: "generate", "static", or "auto" (static on CUDA where the model allows it)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 32,
        eos_token_ids: Sequence[int] | None = None,
        decoder: str = "auto",
        static_options: dict | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = eos_token_ids or model.generation_config.eos_token_id or tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.pad_token_id = tokenizer.pad_token_id
        self.decoder = self._choose_decoder(decoder)
        self.static_options = static_options or {}  # StaticDecoder keywords (cuda_graphs, ...)
        self._static: StaticDecoder | None = None  # one per engine: a failed graph capture sticks

    def _choose_decoder(self, decoder: str) -> str:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{decoder}'; choose one of {', '.join(DECODERS)}")
        reason = supports_static_decode(self.model)
        if decoder == "static" and reason:
            raise ValueError(f"the static decoder cannot run this model: {reason}")
        if decoder == "auto":
            on_cuda = next(self.model.parameters()).device.type == "cuda"
            if on_cuda and reason:
                log.info("decoding with generate: the static decoder does not support %s", reason)
            return "static" if on_cuda and not reason else "generate"
        return decoder

    def _warpers(self, params: SamplingParams) -> list[LogitsProcessor]:
        procs = []
        if params.forking is not None:
            procs.append(ForkingTemperatureWarper(params.forking))
        elif params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=params.top_p))
        return procs

    def _split(self, row: int, sample: int, tokens, logprobs, entropy, max_new: int) -> Generation:
        """Cut one row at its first EOS (kept as a generated token) or at max_new_tokens."""
        hits = np.flatnonzero(np.isin(tokens, self.eos_token_ids))
        end, reason = (int(hits[0]) + 1, "stop") if len(hits) else (max_new, "length")
        return Generation(
            row,
            sample,
            tokens[:end].astype(np.int32),
            reason,
            logprobs[:end].astype(np.float32),
            None if entropy is None else entropy[:end].astype(np.float32),
        )

    @torch.inference_mode()
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Generation]:
        jobs = sample_jobs(len(prompt_token_ids), params.samples_per_prompt)
        if self.decoder == "static":  # longest prompts first: little padding, early OOM
            jobs.sort(key=lambda job: -len(prompt_token_ids[job[0]]))
        results: list[Generation] = []
        samples_done = Counter()
        finished_prompts = 0
        t0 = time.perf_counter()
        refill = self.decoder == "static" and self.static_options.get("refill", False)
        chunk = len(jobs) if refill else self.batch_size  # refill: one decode, batch_size rows
        for start in range(0, len(jobs), chunk):
            batch = jobs[start : start + chunk]
            prompts = [prompt_token_ids[row] for row, _ in batch]
            seed = batch_seed(params.seed, start)
            if refill:
                tokens, logprobs, entropy = self._static_batch(
                    prompts, params, seed, self._refill_progress(progress, params, t0)
                )
            elif self.decoder == "static":
                tokens, logprobs, entropy = self._static_batch(prompts, params, seed)
            else:
                tokens, logprobs, entropy = self._generate_batch(prompts, params, seed)
            for b, (row, sample) in enumerate(batch):
                results.append(
                    self._split(
                        row,
                        sample,
                        tokens[b],
                        logprobs[b],
                        None if entropy is None else entropy[b],
                        params.max_new_tokens,
                    )
                )
                samples_done[row] += 1
                finished_prompts += samples_done[row] == params.samples_per_prompt
            if progress is not None:
                progress(finished_prompts, len(prompt_token_ids), time.perf_counter() - t0)
        results.sort(key=lambda g: (g.prompt_row, g.sample_index))
        return results

    def _generate_batch(self, prompts, params: SamplingParams, seed: int):
        """transformers' generate: tokens, logprobs (B, steps), entropy (B, steps) or None."""
        device = next(self.model.parameters()).device
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        ids, mask, _ = left_pad(prompts, self.pad_token_id)
        torch.manual_seed(seed)
        recorder = _SampledLogprobRecorder()
        entropy = _EntropyRecorder(params.entropy_temperature) if params.record_entropy else None
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList(
                ([entropy] if entropy else []) + self._warpers(params) + [recorder]
            ),
        )
        new = out[:, ids.shape[1] :]
        logprobs = (
            recorder.finish(new[:, -1]).numpy() if new.shape[1] else np.zeros((len(prompts), 0))
        )
        return (
            new.cpu().numpy(),
            logprobs,
            None if entropy is None else entropy.finish(len(prompts)),
        )

    @staticmethod
    def _refill_progress(progress: Progress | None, params: SamplingParams, t0: float):
        """on_done for a refilling decode: jobs done -> prompts done (approximately, in order)."""
        if progress is None:
            return None
        per_prompt = params.samples_per_prompt
        return lambda done, jobs: progress(
            done // per_prompt, jobs // per_prompt, time.perf_counter() - t0
        )

    def _static_batch(self, prompts, params: SamplingParams, seed: int, on_done=None):
        """Decode `prompts` in one batch, or, with on_done or static_options' `refill`, through
        batch_size rows refilled as they finish (continuous batching)."""
        if self._static is None:
            options = {k: v for k, v in self.static_options.items() if k != "refill"}
            self._static = StaticDecoder(
                self.model, self.eos_token_ids, self.pad_token_id, **options
            )
        decoder = self._static
        generator = torch.Generator(device=decoder.device).manual_seed(seed)
        sample = make_sampler(
            LogitsProcessorList(self._warpers(params)),
            params.entropy_temperature if params.record_entropy else None,
            generator,
            fused=decoder.fused_sampler,
        )
        refill = self.static_options.get("refill", False)
        tokens, logprobs, entropy = decoder.decode(
            prompts,
            params.max_new_tokens,
            sample,
            params.record_entropy,
            rows=self.batch_size if refill else None,
            on_done=on_done,
        )
        return (
            tokens.cpu().numpy(),
            logprobs.cpu().numpy(),
            None if entropy is None else entropy.cpu().numpy(),
        )
