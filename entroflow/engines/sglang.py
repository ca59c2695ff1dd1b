"""The `sglang` engine: sglang's offline `Engine` behind entroflow's engine interface.

Written against sglang's documented offline API (`sglang.Engine(model_path=..., tp_size=...,
skip_tokenizer_init=True)`, `Engine.generate(input_ids=..., sampling_params=...,
return_logprob=True)`); it cannot be installed on the project's CPU machines (sglang pins its
own CUDA torch), so only the conversion of its outputs is tested there. Install with
`pip install 'entroflow[sglang]'` on a CUDA machine.

Entropy never comes from here: the scorer recomputes it (and the engine log-probs are sglang's
own, for the cross-check in the `check_*` attributes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from entroflow.engines.base import Generation, Progress, SamplingParams, sample_jobs
from entroflow.lm.models import ModelError

INSTALL_HINT = "install the optional extra on a CUDA machine: pip install 'entroflow[sglang]'"


def import_sglang():
    try:
        import sglang
    except ImportError as error:
        raise ModelError(
            f"engine 'sglang' needs the sglang package ({error}); {INSTALL_HINT}"
        ) from None
    return sglang


def sampling_dict(params: SamplingParams, eos_token_ids: Sequence[int]) -> dict:
    """sglang sampling parameters with the same meaning as ours (top_k -1 = off in sglang)."""
    if params.forking is not None:
        raise ValueError(
            "the forking-temperature experiment needs a per-token logits processor; "
            "use engine: hf for temperature sweeps"
        )
    if params.record_entropy:
        raise ValueError("engine 'sglang' does not return entropies; the scorer computes them")
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(eos_token_ids),
        "skip_special_tokens": False,
    }


def to_generation(output: dict, prompt_row: int, sample: int, eos_token_ids) -> Generation:
    """One sglang output dict (`output_ids`, `meta_info`) -> Generation, EOS kept as a token."""
    tokens = np.asarray(output["output_ids"], dtype=np.int32)
    meta = output.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    finish = "stop" if kind in ("stop", "matched") else "length"
    matched = reason.get("matched") if isinstance(reason, dict) else None
    ends_with_eos = len(tokens) and tokens[-1] in eos_token_ids
    if finish == "stop" and not ends_with_eos and isinstance(matched, int):
        tokens = np.append(tokens, np.int32(matched))  # some versions leave the stop token out
    pairs = meta.get("output_token_logprobs") or []  # [(logprob, token_id, text|None), ...]
    logprobs = np.full(len(tokens), np.nan, dtype=np.float32)
    for i, entry in enumerate(pairs[: len(tokens)]):
        value = entry[0]
        logprobs[i] = np.nan if value is None or not math.isfinite(value) else value
    return Generation(prompt_row, sample, tokens, finish, logprobs)


class SGLangEngine:
    def __init__(
        self,
        model_path: str,
        tokenizer,
        batch_size: int = 256,
        tp_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        **engine_kwargs,
    ):
        sglang = import_sglang()
        eos = eos_token_ids or tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.batch_size = batch_size
        self.engine = sglang.Engine(
            model_path=model_path,
            tp_size=tp_size,
            dtype=dtype,
            random_seed=seed,
            skip_tokenizer_init=True,  # token ids in, token ids out
            **engine_kwargs,
        )

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        progress: Progress | None = None,
    ) -> list[Generation]:
        sampling = sampling_dict(params, self.eos_token_ids)
        jobs = sample_jobs(len(prompt_token_ids), params.samples_per_prompt)
        results: list[Generation] = []
        t0 = time.perf_counter()
        for start in range(0, len(jobs), self.batch_size):  # sglang schedules within a call
            batch = jobs[start : start + self.batch_size]
            outputs = self.engine.generate(
                input_ids=[list(map(int, prompt_token_ids[row])) for row, _ in batch],
                sampling_params=sampling,
                return_logprob=True,
            )
            for (row, sample), output in zip(batch, outputs, strict=True):
                results.append(to_generation(output, row, sample, self.eos_token_ids))
            if progress is not None:  # jobs run in order: a prompt is done with its last sample
                done = batch[-1][0] + (batch[-1][1] == params.samples_per_prompt - 1)
                progress(done, len(prompt_token_ids), time.perf_counter() - t0)
        return results

    def shutdown(self) -> None:
        self.engine.shutdown()
