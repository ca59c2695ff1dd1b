"""The per-token stages as library calls: generate a shard, score it, gather shards.

Each takes and returns a `TokenTable` (the HDF5 contract in memory), so rule scripts only read,
call and write, and the same calls work from a notebook or another workflow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from importlib import metadata

import numpy as np
import pandas as pd
import torch

from entroflow.data.answers import is_correct
from entroflow.engines import Engine, SamplingParams
from entroflow.engines.base import Generation
from entroflow.errors import EntroflowError
from entroflow.io import TokenTable, flatten, str_array, vocab_group
from entroflow.journal import BatchJournal, fingerprint, folder_fingerprint, load_or_compute
from entroflow.lm.entropy import ENTROPY_CONVENTION
from entroflow.lm.scoring import choose_head_method, score_responses, unwrap_peft

log = logging.getLogger(__name__)


class PromptTooLongError(EntroflowError):
    pass


def package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("entroflow", "torch", "transformers", "h5py", "numpy"):
        try:
            versions[f"version_{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[f"version_{pkg}"] = "unknown"
    return versions


def shard_rows(n_rows: int, shard: int, n_shards: int) -> np.ndarray:
    """Contiguous, balanced split of prompt rows: shard i of n (0-based)."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    return np.array_split(np.arange(n_rows), n_shards)[shard]


def check_prompt_lengths(
    prompt_ids: Sequence[Sequence[int]], ids: Sequence[str], context: int | None, max_new: int
) -> None:
    if context is None:
        return
    for pid, tokens in zip(ids, prompt_ids, strict=True):
        if len(tokens) >= context:
            raise PromptTooLongError(
                f"prompt '{pid}' has {len(tokens)} tokens, at or over the model's context of {context}"
            )
    longest = max((len(t) for t in prompt_ids), default=0)
    if longest + max_new > context:
        log.warning(
            "longest prompt (%d tokens) + max_new_tokens (%d) exceeds the context (%d): "
            "those responses will be cut short",
            longest,
            max_new,
            context,
        )


def generation_table(
    problems: pd.DataFrame,
    prompt_ids: Sequence[Sequence[int]],
    generations,
    tokenizer,
    dataset_index: np.ndarray,
    attrs: dict,
) -> TokenTable:
    """Generations (any order) -> contract tables, responses sorted by (prompt, sample)."""
    generations = sorted(generations, key=lambda g: (g.prompt_row, g.sample_index))
    prompt_flat, prompt_off = flatten(prompt_ids, np.int32)
    tok_flat, tok_off = flatten([g.token_ids for g in generations], np.int32)
    eng_flat, _ = flatten([g.engine_logprob for g in generations], np.float32)
    texts = tokenizer.batch_decode(
        [g.token_ids.tolist() for g in generations], skip_special_tokens=True
    )
    return TokenTable(
        groups={
            "prompts": {
                "text": str_array(problems["prompt"]),
                "answer": str_array(problems["answer"]),
                "id": str_array(problems["id"]),
                "offsets": prompt_off,
                "token_ids": prompt_flat,
                "dataset_index": np.asarray(dataset_index, dtype=np.int32),
            },
            "responses": {
                "offsets": tok_off,
                "prompt_index": np.asarray([g.prompt_row for g in generations], dtype=np.int32),
                "sample_index": np.asarray([g.sample_index for g in generations], dtype=np.int32),
                "finish_reason": str_array(g.finish_reason for g in generations),
                "correct": np.full(len(generations), -1, dtype=np.int8),
                "text": str_array(texts),
            },
            "tokens": {"token_id": tok_flat, "engine_logprob": eng_flat},
        },
        attrs=attrs,
    )


def _generations_to_arrays(generations: Sequence[Generation]) -> dict[str, np.ndarray]:
    tokens, offsets = flatten([g.token_ids for g in generations], np.int32)
    logprobs, _ = flatten([g.engine_logprob for g in generations], np.float32)
    return {
        "prompt_row": np.asarray([g.prompt_row for g in generations], dtype=np.int64),
        "sample_index": np.asarray([g.sample_index for g in generations], dtype=np.int64),
        "finish_reason": np.asarray([g.finish_reason for g in generations], dtype="U8"),
        "offsets": offsets,
        "token_ids": tokens,
        "engine_logprob": logprobs,
    }


def _arrays_to_generations(saved: dict[str, np.ndarray]) -> list[Generation]:
    off = saved["offsets"]
    return [
        Generation(
            int(saved["prompt_row"][i]),
            int(saved["sample_index"][i]),
            saved["token_ids"][off[i] : off[i + 1]],
            str(saved["finish_reason"][i]),
            saved["engine_logprob"][off[i] : off[i + 1]],
        )
        for i in range(len(off) - 1)
    ]


def generate_shard(
    problems: pd.DataFrame,
    prompt_ids: Sequence[Sequence[int]],
    engine: Engine,
    tokenizer,
    params: SamplingParams,
    shard: int,
    n_shards: int,
    context: int | None = None,
    attrs: dict | None = None,
    progress=None,
    prompts_per_batch: int = 8,
    journal: BatchJournal | None = None,
) -> TokenTable:
    """Sample `params.samples_per_prompt` responses for this shard's prompts.

    Prompts go to the engine `prompts_per_batch` at a time; batch b is seeded from the seed and
    its first prompt's row in the dataset, so the result depends on neither the engine's own
    batching nor on where a preempted run stopped. With a `journal`, finished batches are saved
    and a rerun continues after the last saved one.
    """
    rows = shard_rows(len(problems), shard, n_shards)
    sub = problems.iloc[rows].reset_index(drop=True)
    sub_ids = [prompt_ids[i] for i in rows]
    check_prompt_lengths(sub_ids, list(sub["id"]), context, params.max_new_tokens)
    generations: list[Generation] = []
    t0 = time.perf_counter()
    starts = range(0, len(rows), max(1, prompts_per_batch))
    for index, start in enumerate(starts):

        def compute(start=start):
            batch_params = dataclasses.replace(params, seed=params.seed + 7919 * int(rows[start]))
            batch = engine.generate(sub_ids[start : start + prompts_per_batch], batch_params)
            for g in batch:
                g.prompt_row += start
            return _generations_to_arrays(batch)

        generations += _arrays_to_generations(load_or_compute(journal, index, compute))
        if progress is not None:
            progress(min(start + prompts_per_batch, len(rows)), len(rows), time.perf_counter() - t0)
    meta = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "samples_per_prompt": params.samples_per_prompt,
        "seed": params.seed,
        "shard": shard,
        "n_shards": n_shards,
        "prompts_per_batch": prompts_per_batch,
        **package_versions(),
        **(attrs or {}),
    }
    return generation_table(sub, sub_ids, generations, tokenizer, rows, meta)


def generation_key(prompt_ids: Sequence[Sequence[int]], model_dir: str, settings: dict) -> str:
    """What a generation shard's saved batches depend on: prompts, model files, settings."""
    flat, offsets = flatten(prompt_ids, np.int64)
    return fingerprint("generate", flat, offsets, folder_fingerprint(model_dir), settings)


def scoring_key(table: TokenTable, model_dir: str, settings: dict) -> str:
    """What a scoring job's saved batches depend on: the tokens to score, model files, settings."""
    arrays = [
        table[name]
        for name in (
            "prompts/token_ids",
            "prompts/offsets",
            "responses/offsets",
            "responses/prompt_index",
            "tokens/token_id",
        )
    ]
    return fingerprint("score", *arrays, folder_fingerprint(model_dir), settings)


def score_table(
    table: TokenTable,
    model,
    pad_token_id: int,
    temperature: float,
    max_tokens_per_batch: int = 16384,
    chunk_rows: int = 1024,
    head_method: str = "auto",
    progress=None,
    journal: BatchJournal | None = None,
) -> TokenTable:
    """Add tokens/entropy and tokens/logprob from one teacher-forced pass (resumable with a journal)."""
    prompts = [table.prompt_tokens(int(p)) for p in table["responses/prompt_index"]]
    responses = [table.response_tokens(i) for i in range(table.n_responses)]
    scored = score_responses(
        model,
        prompts,
        responses,
        pad_token_id=pad_token_id,
        temperature=temperature,
        max_tokens_per_batch=max_tokens_per_batch,
        chunk_rows=chunk_rows,
        head_method=head_method,
        progress=progress,
        journal=journal,
    )
    entropy, _ = flatten([s.entropy for s in scored], np.float32)
    logprob, _ = flatten([s.logprob for s in scored], np.float32)
    groups = {g: dict(d) for g, d in table.groups.items()}
    groups["tokens"]["entropy"] = entropy
    groups["tokens"]["logprob"] = logprob
    attrs = {
        **table.attrs,
        "entropy_convention": ENTROPY_CONVENTION,
        "score_temperature": temperature,
        "score_head": choose_head_method(
            unwrap_peft(model), next(model.parameters()).device, head_method
        ),
    }
    return TokenTable(groups=groups, attrs=attrs)


@torch.no_grad()
def reference_scores(model, prompt, response, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """One sequence, unpadded, its whole logits in float64: entropy and log-prob of the response
    tokens by an independent path (no batching, padding, row chunks or fp32 accumulation)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(response)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature  # (L, V)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    labels = torch.as_tensor(np.asarray(response), dtype=torch.long, device=device)
    return entropy.cpu().numpy(), logp.gather(-1, labels[:, None])[:, 0].cpu().numpy()


def scoring_checks(table: TokenTable, model, temperature: float, n_reference: int = 4) -> dict:
    """Agreement numbers stored with every scored file (attrs `check_*`):

    - engine vs scorer log-probs of the sampled tokens (equal up to float noise when sampling
      used this temperature without top-p/top-k; otherwise the engine's are the truncated ones);
    - the scorer vs `reference_scores` on the first `n_reference` non-empty responses.
    """
    eng, ours = table["tokens/engine_logprob"], table["tokens/logprob"]
    finite = np.isfinite(eng)
    checks = {
        "check_engine_vs_scorer_logprob_max_abs_diff": float(
            np.abs(eng[finite] - ours[finite]).max()
        )
        if finite.any()
        else float("nan"),
    }
    picked = [i for i in range(table.n_responses) if len(table.response_tokens(i))][:n_reference]
    h_err = lp_err = 0.0
    for i in picked:
        prompt = table.prompt_tokens(int(table["responses/prompt_index"][i]))
        h_ref, lp_ref = reference_scores(model, prompt, table.response_tokens(i), temperature)
        h_err = max(h_err, float(np.abs(table.response_tokens(i, "entropy") - h_ref).max()))
        lp_err = max(lp_err, float(np.abs(table.response_tokens(i, "logprob") - lp_ref).max()))
    checks["check_reference_responses"] = len(picked)
    checks["check_scorer_vs_float64_entropy_max_abs_diff"] = h_err
    checks["check_scorer_vs_float64_logprob_max_abs_diff"] = lp_err
    return checks


def merge_checks(tables: Sequence[TokenTable]) -> dict:
    """Shard checks -> one set for the gathered file: the worst shard's value (responses summed)."""
    keys = sorted({k for t in tables for k in t.attrs if k.startswith("check_")})
    merged = {}
    for key in keys:
        values = [float(t.attrs[key]) for t in tables if key in t.attrs]
        merged[key] = (
            int(sum(values)) if key == "check_reference_responses" else float(np.nanmax(values))
        )
    return merged


def mark_correctness(table: TokenTable) -> TokenTable:
    """responses/correct from math-verify against prompts/answer (-1 where there is none)."""
    answers = table["prompts/answer"]
    correct = np.asarray(
        [
            is_correct(text, answers[p] or None)
            for text, p in zip(
                table["responses/text"], table["responses/prompt_index"], strict=True
            )
        ],
        dtype=np.int8,
    )
    table.groups["responses"]["correct"] = correct
    return table


def add_vocab(table: TokenTable, tokenizer) -> TokenTable:
    table.groups["vocab"] = vocab_group(table["tokens/token_id"], tokenizer)
    return table
