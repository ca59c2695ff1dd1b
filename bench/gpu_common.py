"""Helpers shared by the GPU benchmarks: random-weight Qwen2.5 shapes, timing, peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# Qwen2.5-0.5B / 1.5B shapes (config.json of the hub models), vocabulary 151,936, tied head;
# "tiny" (vocabulary 4,096) only so the benchmarks' code can run on a CPU.
QWEN25_SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
}  # fmt: skip


def random_qwen(
    shape: str, dtype=torch.bfloat16, seed: int = 0, device: str = "cuda"
) -> Qwen2ForCausalLM:
    """A random-weight Qwen2.5-shaped model on the GPU (sdpa attention), in eval mode."""
    kw = dict(
        vocab_size=151_936,
        max_position_embeddings=32_768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        eos_token_id=151_645,
        pad_token_id=151_643,
        bos_token_id=151_643,
    )
    kw.update(QWEN25_SHAPES[shape])
    if shape == "tiny":
        kw.update(eos_token_id=1, pad_token_id=0, bos_token_id=0)
    config = Qwen2Config(**kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def cuda_seconds(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() with the GPU synchronised around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak GPU memory (GiB) allocated while fn() runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**30


def out_of_memory(fn: Callable[[], object]) -> bool:
    try:
        fn()
        return False
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return True
