"""The `hf` engine's decode loop for GPUs: static KV cache, CUDA graphs, finished rows retired.

`generate` re-plans every step on the host and keeps a batch until its longest chain of thought
ends. Here the whole batch lives in preallocated tensors and one decode step is

    token (B, 1), position (B, 1), write column  ->  K/V written in place  ->  logits (B, V)

which on CUDA is compiled once with torch.compile (batch size and window marked dynamic) and
captured as a CUDA graph per batch size and window, then replayed. Rows are left-padded
prompts; their K/V sit in cache columns, their RoPE positions are their own, and a (B, L) "valid"
mask says which columns each row may attend to. Attention reads only the columns written so far
(rounded up to 256, one graph per window) and, for grouped-query models, each K/V head once
(`grouped_attention`). Every `check_every` steps the host looks at how many rows are still
running; when they fit in half the batch, the live rows (cache, mask, positions) are copied into
a batch of the next power of two, so long-tail chains of thought do not keep paying for
finished ones.

Sampling is the same processor list as the `generate` path (temperature or forking temperature,
top-k, top-p) followed by an exact categorical draw; the engine log-prob and, when asked, the
full-vocabulary entropy under softmax(logits / T) are taken from the same fp32 logits. Plain
temperature sampling on CUDA does all three in one Triton kernel (`sample_with_entropy`).

The cache, its memory check and the grouped attention live in `static_cache.py`.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from transformers import TemperatureLogitsWarper

from entroflow.engines.static_cache import (
    GROUPED_ATTENTION,
    StaticKVCache,
    check_cache_fits,
    free_device_bytes,
    mark_dynamic,
)
from entroflow.lm.batching import left_pad
from entroflow.lm.entropy import entropy_and_logprob
from entroflow.lm.fused_entropy import fused_supported, logits_entropy, sample_with_entropy
from entroflow.lm.scoring import check_head, decoder_body, head_logits, unwrap_peft

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """Everything one decode step reads and writes, for one batch size."""

    cache: StaticKVCache
    valid: torch.Tensor  # (B, L) bool: cache columns each row may attend to
    token: torch.Tensor  # (B, 1) long: the token fed at this step
    position: torch.Tensor  # (B, 1) long: its RoPE position
    column: torch.Tensor  # (1,) long: the cache column this step writes; (B,) when per_row
    job: torch.Tensor  # (B,) long: output row of each batch row (`spare` for padding rows)
    finished: torch.Tensor  # (B,) bool
    spare: int
    per_row: bool = False  # refilling: each row writes its own column, counts its own tokens
    age: torch.Tensor | None = None  # (B,) long, per_row: tokens each row has sampled so far
    visible: int = 0  # cache columns attention reads this step (a multiple of visible_step)
    graph: torch.cuda.CUDAGraph | None = None  # captured for this size and `visible`
    logits: torch.Tensor | None = None  # the graph's output (B, V) fp32

    @property
    def size(self) -> int:
        return self.token.shape[0]


@dataclass
class _Outputs:
    """Sampled tokens, log-probs and entropies per job (N, max_new); the last row is spare."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None

    @classmethod
    def empty(cls, rows: int, max_new: int, pad: int, with_entropy: bool, device):
        return cls(
            torch.full((rows, max_new), pad, device=device),
            torch.zeros(rows, max_new, device=device),
            torch.zeros(rows, max_new, device=device) if with_entropy else None,
        )

    def record(self, batch: _Batch, sampled, eos, max_new: int, rows=None) -> None:
        """Store each row's sample at its age, mark rows ending (EOS, max_new), feed the token.
        `rows`: the batch rows `sampled` belongs to (default all)."""
        tokens, logprobs, entropy = sampled
        rows = slice(None) if rows is None else rows
        job, age = batch.job[rows], batch.age[rows]
        self.tokens[job, age] = tokens
        self.logprobs[job, age] = logprobs
        if self.entropy is not None:
            self.entropy[job, age] = entropy
        ended = batch.finished[rows] | torch.isin(tokens, eos) | (age >= max_new - 1)
        batch.finished[rows] = ended
        batch.job[rows] = job.masked_fill(ended, batch.spare)
        batch.age[rows] = (age + 1).clamp_(max=max_new - 1)
        batch.token[rows] = tokens[:, None]

    def first(self, n: int):
        return (
            self.tokens[:n],
            self.logprobs[:n],
            None if self.entropy is None else self.entropy[:n],
        )


@dataclass
class _Rows:
    """Host-side view of a refilling batch: each row's job and an upper bound on the cache
    column it writes (rows that finish stop moving; the bound keeps going up to `last`)."""

    job: np.ndarray  # (B,) the job each row decodes, -1 once reported done
    column: np.ndarray  # (B,) bound on the column written this step
    last: np.ndarray  # (B,) the last column the row can write
    max_new: int
    done: int = 0

    @classmethod
    def start(cls, batch: _Batch, width: int, max_new: int):
        job = batch.job.cpu().numpy().copy()
        job[job == batch.spare] = -1
        column = np.full(batch.size, width - 1)
        return cls(job, column, column + max_new - 1, max_new)

    def advance(self) -> int:
        """The next step's column bound for every row; returns the largest."""
        np.minimum(self.column + 1, self.last, out=self.column)
        return int(self.column.max())

    def retire(self, finished: np.ndarray, on_done, total: int) -> None:
        ended = finished & (self.job >= 0)
        self.done += int(ended.sum())
        self.job[ended] = -1
        if on_done is not None and ended.any():
            on_done(self.done, total)

    def refilled(self, rows: np.ndarray, jobs: list[int], width: int) -> None:
        self.job[rows] = jobs
        self.column[rows] = width - 1
        self.last[rows] = width - 1 + self.max_new - 1

    def shrunk(self, live: np.ndarray, size: int) -> _Rows:
        rows = np.concatenate([live, np.repeat(live[:1], size - len(live))])
        job = self.job[rows]
        job[len(live) :] = -1
        return _Rows(job, self.column[rows], self.last[rows], self.max_new, self.done)


def supports_static_decode(model) -> str | None:
    """None if this decode loop can run `model`, else the reason it cannot."""
    lm = unwrap_peft(model)
    layer_types = getattr(lm.config, "layer_types", None)
    kinds = set(layer_types or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention is supported)"
    window = getattr(lm.config, "sliding_window", None)  # Mistral, Phi-3: no layer_types
    if layer_types is None and window and getattr(lm.config, "use_sliding_window", True):
        return f"sliding-window attention (window {window}; only full attention is supported)"
    if getattr(lm.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if lm.config._attn_implementation not in ("sdpa", "eager"):
        return f"attention '{lm.config._attn_implementation}' (sdpa or eager are supported)"
    return None


ALIGN = 8  # cache columns: the window is a multiple of this, below the cache length


def next_bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def cache_keyword(body) -> str:
    """The name the decoder body's forward takes its cache under: `cache` from transformers
    5.24 on (`past_key_values` deprecated there), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def decode_logits(body, lm, token, position, mask, cache, cache_key) -> torch.Tensor:
    """One decode step of the decoder `body` and head of `lm`: (B, V) fp32 logits.

    token, position (B, 1) long; mask (B, 1, 1, visible) bool; cache a StaticKVCache passed
    as `cache_key` (see `cache_keyword`).
    """
    hidden = body(
        input_ids=token,
        position_ids=position,
        attention_mask=mask,  # 4-D: every model's mask builder passes it through unchanged
        use_cache=True,
        **{cache_key: cache},
    ).last_hidden_state  # (B, 1, H)
    return head_logits(lm, hidden[:, 0]).float()


_COMPILED: dict[str, object] = {}


def compiled_decode_logits(backend: str = "inductor"):
    """`decode_logits` through torch.compile, one per process and backend (dynamic batch size
    and attention window, so bucket and window changes do not recompile)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(decode_logits, dynamic=True, backend=backend)
    return _COMPILED[backend]


class StaticDecoder:
    """Samples up to `max_new_tokens` for a batch of prompts (one call per batch).

    cuda_graphs: replay each step from a CUDA graph (CUDA only). compile: run the step through
    torch.compile ("auto": on CUDA; a backend name such as "aot_eager" for tests), which fuses
    the elementwise work (norms, rotary, activations, residuals) that otherwise costs a few
    hundred kernels per step. check_every, min_bucket: how often the host looks for finished
    rows, and the smallest batch they are retired into. visible_step: the attention window
    grows by this many cache columns. fused_sampler: draw plain-temperature samples with the
    one-read Triton kernel (None: on CUDA).
    """

    def __init__(
        self,
        model,
        eos_token_ids,
        pad_token_id: int,
        *,
        cuda_graphs: bool = True,
        check_every: int = 16,
        min_bucket: int = 8,
        visible_step: int = 256,
        compile: bool | str = "auto",
        fused_sampler: bool | None = None,
    ):
        self.lm = unwrap_peft(model)
        check_head(self.lm)
        self.body = decoder_body(self.lm)
        self.cache_key = cache_keyword(self.body)
        self.device = next(self.lm.parameters()).device
        self.dtype = next(self.lm.parameters()).dtype
        self.eos = torch.tensor(sorted(eos_token_ids), device=self.device)
        self.pad_token_id = pad_token_id
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.check_every = check_every
        self.min_bucket = min_bucket
        if visible_step <= 0 or visible_step % ALIGN:
            raise ValueError(
                f"visible_step must be a positive multiple of {ALIGN}, got {visible_step}"
            )
        self.visible_step = visible_step
        if compile == "auto":
            compile = self.device.type == "cuda"
        backend = "inductor" if compile is True else compile
        self._logits = compiled_decode_logits(backend) if compile else decode_logits
        self._compile_checked = not compile
        self.fused_sampler = fused_sampler  # None: on CUDA (see make_sampler)

    # -- one step -------------------------------------------------------------------------------
    def _forward(self, batch: _Batch) -> torch.Tensor:
        """One decode step for every row: (B, V) fp32 logits. Graph-safe (no host syncs)."""
        if batch.per_row:
            batch.valid.scatter_(1, batch.column[:, None], True)
        else:
            batch.valid.index_fill_(1, batch.column, True)
        batch.cache.write_cols = batch.column
        batch.cache.per_row = batch.per_row
        batch.cache.visible = batch.visible
        mask = batch.valid[:, None, None, : batch.visible]  # (B, 1, 1, visible)
        mark_dynamic(batch.token, batch.position)
        mark_dynamic(mask, dims=(0, 3))
        args = (self.body, self.lm, batch.token, batch.position, mask, batch.cache, self.cache_key)
        if self._compile_checked:
            return self._logits(*args)
        try:  # the first compiled step compiles (outside any graph capture: warm-up runs first)
            logits = self._logits(*args)
        except Exception as error:  # a model torch.compile cannot take: stay uncompiled
            log.warning("torch.compile of the decode step failed (%s); decoding without it", error)
            self._logits = decode_logits
            logits = decode_logits(*args)
        self._compile_checked = True
        return logits

    def _step(self, batch: _Batch, column: int) -> torch.Tensor:
        """Logits of the step that writes cache `column`. Attention reads the columns up to it,
        rounded up to `visible_step` (a new graph every visible_step steps), not the whole cache."""
        step = self.visible_step
        # The cache has ALIGN spare columns (`_decode`): the window stays a multiple of ALIGN
        # (sdpa's fast kernels) and narrower than the cache (one case for torch.compile).
        visible = min(batch.valid.shape[1] - ALIGN, (column // step + 1) * step)
        if visible != batch.visible:
            batch.visible, batch.graph, batch.logits = visible, None, None
        if not self.cuda_graphs:
            return self._forward(batch)
        if batch.graph is None:
            batch.graph, batch.logits = self._capture(batch)
        if batch.graph is None:
            return self._forward(batch)
        batch.graph.replay()
        return batch.logits

    def _capture(self, batch: _Batch):
        """Capture `_forward` for this batch; the warm-up runs repeat this step's own writes."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(batch)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(batch)
            return graph, logits
        except Exception as error:  # a model whose forward cannot be captured: stay eager
            log.warning("CUDA graph capture failed (%s); decoding without graphs", error)
            self.cuda_graphs = False
            return None, None

    # -- a batch --------------------------------------------------------------------------------
    def _run_prompts(self, prompts, size: int, length: int):
        """Prefill `prompts` (padded with one-token rows to `size`) into a new cache of `length`
        columns: cache, valid (size, length) bool, positions (size, W), logits (size, V) fp32."""
        padded = list(prompts) + [[self.pad_token_id]] * (size - len(prompts))
        ids, mask, positions = (t.to(self.device) for t in left_pad(padded, self.pad_token_id))
        width = ids.shape[1]
        valid = torch.zeros(size, length, dtype=torch.bool, device=self.device)
        valid[:, :width] = mask.bool()
        # Causal over the prompt columns; a pad query sees itself so no softmax row is empty.
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        prompt_mask = causal[None] & valid[:, None, :width]
        prompt_mask |= torch.eye(width, dtype=torch.bool, device=self.device)[None]
        cache = StaticKVCache(self.lm.config, size, length, self.dtype, self.device)
        cache.write_cols = torch.arange(width, device=self.device)
        cache.visible = width
        hidden = self.body(
            input_ids=ids,
            position_ids=positions,
            attention_mask=prompt_mask[:, None],  # (B, 1, W, W), 4-D: used as given
            use_cache=True,
            **{self.cache_key: cache},
        ).last_hidden_state
        cache.visible = None
        cache.seen = width
        return cache, valid, positions, head_logits(self.lm, hidden[:, -1]).float()

    def _prefill(self, prompts, length: int, spare_row: int) -> tuple[_Batch, torch.Tensor]:
        size = next_bucket(len(prompts), self.min_bucket)  # no tiny batches to compile for
        free = free_device_bytes(self.device)
        if free is not None:
            check_cache_fits(self.lm.config, size, length, self.dtype, free, self.min_bucket)
        cache, valid, positions, logits = self._run_prompts(prompts, size, length)
        job = torch.arange(size, device=self.device)
        job[len(prompts) :] = spare_row  # padding rows write to the spare output row
        batch = _Batch(
            cache=cache,
            valid=valid,
            token=torch.zeros(size, 1, dtype=torch.long, device=self.device),
            position=positions[:, -1:].clone(memory_format=torch.contiguous_format),
            column=torch.full((1,), positions.shape[1] - 1, dtype=torch.long, device=self.device),
            job=job,
            finished=job == spare_row,
            spare=spare_row,
        )
        return batch, logits

    def _shrink(self, batch: _Batch, live: torch.Tensor) -> _Batch:
        """A smaller batch holding the rows in `live` (and copies of its first row as padding)."""
        size = next_bucket(len(live), self.min_bucket)
        rows = torch.cat([live, live[:1].expand(size - len(live))])
        batch.graph = batch.logits = None  # the old graph holds the old cache's memory
        cache = StaticKVCache.moved_rows(batch.cache, rows)
        finished = torch.ones(size, dtype=torch.bool, device=self.device)
        finished[: len(live)] = False
        return _Batch(
            cache=cache,
            valid=batch.valid[rows].clone(),
            token=batch.token[rows].clone(),
            position=batch.position[rows].clone(),
            column=batch.column[rows].clone() if batch.per_row else batch.column.clone(),
            job=batch.job[rows].masked_fill(finished, batch.spare),
            finished=finished,
            spare=batch.spare,
            per_row=batch.per_row,
            age=None if batch.age is None else batch.age[rows].clone(),
        )

    def decode(
        self, prompts, max_new_tokens: int, sample, record_entropy: bool, rows=None, on_done=None
    ):
        """See `_decode`; with `rows` fewer than the prompts, `_decode_refilling` (continuous
        batching: `rows` rows, each refilled with the next waiting prompt when it finishes).
        Attention runs through `grouped_attention` meanwhile."""
        config = self.lm.config
        previous = config._attn_implementation
        config._attn_implementation = GROUPED_ATTENTION
        try:
            if rows is not None and rows < len(prompts):
                return self._decode_refilling(
                    prompts, max_new_tokens, sample, record_entropy, rows, on_done
                )
            return self._decode(prompts, max_new_tokens, sample, record_entropy)
        finally:
            config._attn_implementation = previous

    @torch.inference_mode()
    def _decode(self, prompts, max_new_tokens: int, sample, record_entropy: bool):
        """Returns tokens (N, max_new), logprobs (N, max_new), entropy (N, max_new) or None.

        `sample(logits (B, V) fp32) -> (tokens (B,), logprobs (B,), entropy (B,) | None)`.
        Rows are cut at EOS by the caller; positions after a row's EOS hold whatever was sampled.
        """
        n = len(prompts)
        width = max(len(p) for p in prompts)
        length = -(-(width + max_new_tokens) // ALIGN) * ALIGN + ALIGN  # see `_step`
        out_tokens = torch.full((n + 1, max_new_tokens), self.pad_token_id, device=self.device)
        out_logprobs = torch.zeros(n + 1, max_new_tokens, device=self.device)
        out_entropy = (
            torch.zeros(n + 1, max_new_tokens, device=self.device) if record_entropy else None
        )
        batch, logits = self._prefill(prompts, length, spare_row=n)
        for t in range(max_new_tokens):
            tokens, logprobs, entropy = sample(logits)
            out_tokens[batch.job, t] = tokens
            out_logprobs[batch.job, t] = logprobs
            if out_entropy is not None:
                out_entropy[batch.job, t] = entropy
            batch.finished |= torch.isin(tokens, self.eos)
            if t == max_new_tokens - 1:
                break
            batch.token.copy_(tokens[:, None])
            if (t + 1) % self.check_every == 0:
                live = torch.nonzero(~batch.finished).squeeze(1)  # host sync, every few steps
                if len(live) == 0:
                    break
                if next_bucket(len(live), self.min_bucket) < batch.size:
                    batch = self._shrink(batch, live)
            batch.position.add_(1)
            batch.column.fill_(width + t)
            logits = self._step(batch, width + t)
        return out_tokens[:n], out_logprobs[:n], None if out_entropy is None else out_entropy[:n]

    # -- continuous batching --------------------------------------------------------------------
    @torch.inference_mode()
    def _decode_refilling(self, prompts, max_new_tokens, sample, record_entropy, rows, on_done):
        """`_decode` for more prompts than rows: every `check_every` steps, finished rows take
        the next waiting prompts (prefilled together, their K/V copied into the freed rows'
        first columns); once none wait, finished rows are retired as in `_decode`.

        Rows are out of step, so each writes its own cache column (`per_row`) and counts its own
        tokens (`age`); finished rows stop moving and write to the spare output row. The host
        keeps an upper bound on each row's column (`_Rows`) to size the attention window without
        a sync. on_done(jobs finished, jobs) is called at each check.
        """
        n = len(prompts)
        width = max(len(p) for p in prompts)
        length = -(-(width + max_new_tokens) // ALIGN) * ALIGN + ALIGN  # see `_step`
        out = _Outputs.empty(n + 1, max_new_tokens, self.pad_token_id, record_entropy, self.device)
        size = next_bucket(rows, self.min_bucket)
        batch, logits = self._prefill(prompts[:size], length, spare_row=n)
        batch.per_row = True
        batch.column = batch.column.expand(batch.size).clone()
        batch.age = torch.zeros(batch.size, dtype=torch.long, device=self.device)
        host = _Rows.start(batch, max(len(p) for p in prompts[:size]), max_new_tokens)
        waiting = deque(range(size, n))
        for step in itertools.count(1):
            out.record(batch, sample(logits), self.eos, max_new_tokens)
            if step % self.check_every == 0:
                finished = batch.finished.cpu().numpy()  # host sync, every few steps
                host.retire(finished, on_done, n)
                if waiting and finished.any():
                    self._refill(batch, host, finished, waiting, prompts, sample, out)
                elif not waiting and finished.all():
                    break
                elif not waiting:
                    live = np.flatnonzero(~finished)
                    if next_bucket(len(live), self.min_bucket) < batch.size:
                        batch = self._shrink(batch, torch.as_tensor(live, device=self.device))
                        host = host.shrunk(live, batch.size)
            moving = ~batch.finished
            batch.position.add_(moving[:, None])
            batch.column.add_(moving)
            logits = self._step(batch, host.advance())
        return out.first(n)

    def _refill(self, batch: _Batch, host, finished, waiting, prompts, sample, out) -> None:
        """Prefill waiting prompts into finished rows and sample their first tokens."""
        free = np.flatnonzero(finished)[: len(waiting)]
        jobs = [waiting.popleft() for _ in free]
        new = [prompts[j] for j in jobs]
        width = max(len(p) for p in new)
        cache, valid, positions, logits = self._run_prompts(new, len(new), width)
        rows = torch.as_tensor(free, device=self.device)
        batch.cache.put_rows(rows, cache)
        batch.valid[rows] = False
        batch.valid[rows, :width] = valid
        batch.position[rows] = positions[:, -1:]
        batch.column[rows] = width - 1
        batch.job[rows] = torch.as_tensor(jobs, device=self.device)
        batch.age[rows] = 0
        batch.finished[rows] = False
        out.record(batch, sample(logits), self.eos, out.tokens.shape[1], rows)
        host.refilled(free, jobs, width)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One exact draw per row of probs (B, V): argmax p / E with E ~ Exp(1) (no host sync)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def plain_temperature(processors) -> float | None:
    """T when `processors` only divide logits by a temperature (or do nothing), else None."""
    if len(processors) == 0:
        return 1.0
    if len(processors) == 1 and type(processors[0]) is TemperatureLogitsWarper:
        return float(processors[0].temperature)
    return None


def make_sampler(
    processors, entropy_temperature: float | None, generator, fused: bool | None = None
):
    """sample(logits) for StaticDecoder.decode from a transformers processor list.

    Plain temperature sampling on CUDA (`fused` None) or when `fused` is True takes the one-read
    Triton kernel (draw, log-prob and entropy together; its own Philox stream seeded from
    `generator`); top-k / top-p / forking temperature go through the processors.
    """
    temperature = plain_temperature(processors)
    same_entropy = entropy_temperature is None or entropy_temperature == temperature
    if fused is None:
        fused = generator.device.type == "cuda" and fused_supported(generator.device)
    if fused and temperature is not None and same_entropy:
        return _fused_sampler(temperature, entropy_temperature is not None, generator)

    def sample(logits: torch.Tensor):
        entropy = None
        if entropy_temperature is not None and logits.device.type == "cuda":
            entropy = logits_entropy(logits, entropy_temperature)  # one kernel, two reads
        elif entropy_temperature is not None:
            entropy, _ = entropy_and_logprob(logits, None, temperature=entropy_temperature)
        scores = processors(None, logits)
        logp = torch.log_softmax(scores, -1)
        tokens = categorical(logp.exp(), generator)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), entropy

    return sample


def _fused_sampler(temperature: float, with_entropy: bool, generator):
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    calls = 0

    def sample(logits: torch.Tensor):
        nonlocal calls
        calls += 1  # a new Philox stream per step
        return sample_with_entropy(logits, temperature, base + calls, with_entropy)

    return sample
