"""The static decoder's KV cache and the attention that reads it.

`StaticKVCache` preallocates keys and values per layer, (B, kv_heads, L, head_dim), and writes
each step's K/V in place at `write_cols`; attention sees the first `visible` columns.
`check_cache_fits` refuses a batch whose cache alone would not fit on the GPU, naming a batch
size that does. `grouped_attention` (registered with transformers as `GROUPED_ATTENTION`) reads
each K/V head once for grouped-query models at decode time. The decode loop that drives them is
`static_decode.py`.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface


def mark_dynamic(*tensors: torch.Tensor, dims: tuple[int, ...] = (0,)) -> None:
    """Tell torch.compile these sizes vary (batch buckets, windows, cache lengths), so that its
    first graph is already the general one instead of one specialised to the first batch."""
    for tensor in tensors:
        torch._dynamo.mark_dynamic(tensor, dims)


def cache_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    """(B, kv_heads, L, head_dim): one layer's keys (or values) in the static cache."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return batch, kv_heads, length, head_dim


def cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a StaticKVCache: keys and values of every layer."""
    elements = math.prod(cache_shape(config, batch, length))
    return 2 * config.num_hidden_layers * elements * dtype.itemsize


def check_cache_fits(
    config, batch: int, length: int, dtype: torch.dtype, free: int, min_bucket: int = 1
) -> None:
    """Fail before prefill, naming a batch_size that fits, when the cache alone exceeds `free`
    bytes (rather than an out-of-memory error once the prompts have run)."""
    need = cache_bytes(config, batch, length, dtype)
    if need <= free:
        return
    rows = free // cache_bytes(config, 1, length, dtype)
    largest = 2 ** int(math.log2(rows)) if rows else 0  # batches are padded to powers of two
    advice = (
        f"set the experiment's batch_size to {largest} or less, or lower max_new_tokens"
        if largest >= min_bucket
        else f"not even {min_bucket} rows (the smallest batch) of this length fit: lower "
        "max_new_tokens or use a larger GPU"
    )
    gib = 2**30
    raise torch.OutOfMemoryError(
        f"the static decoder's KV cache for {batch} rows x {length} columns (longest prompt + "
        f"max_new_tokens) needs {need / gib:.2f} GiB, but only {free / gib:.2f} GiB are free on "
        f"the GPU: {advice}."
    )


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a CUDA device (free + cached by torch); None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class StaticKVCache:
    """Keys and values per layer, (B, kv_heads, L, head_dim) each, written at `write_cols`.

    Duck-types what transformers' attention layers call on a cache (`update`, and
    `get_seq_length` where a model computes positions itself; we always pass positions).
    """

    def __init__(self, config, batch: int, length: int, dtype: torch.dtype, device):
        shape = cache_shape(config, batch, length)
        self.keys = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        mark_dynamic(*self.keys, *self.values, dims=(0, 2))
        self.write_cols = torch.zeros(1, dtype=torch.long, device=device)  # (q_len,) or (B,)
        self.per_row = False  # decode with refilled rows: row b writes column write_cols[b]
        self.visible: int | None = None  # columns attention sees (prefill: the prompt's)
        self.seen = 0

    def update(self, key, value, layer_idx, *args, **kwargs):
        # Extra arguments differ across transformers releases (`cache_kwargs`, `kwargs=`); unused.
        if self.per_row:  # key, value (B, kv_heads, 1, d); row b's goes to column write_cols[b]
            rows = torch.arange(key.shape[0], device=key.device)
            self.keys[layer_idx][rows, :, self.write_cols] = key[:, :, 0]
            self.values[layer_idx][rows, :, self.write_cols] = value[:, :, 0]
        else:
            self.keys[layer_idx].index_copy_(2, self.write_cols, key)
            self.values[layer_idx].index_copy_(2, self.write_cols, value)
        if self.visible is not None:
            return self.keys[layer_idx][:, :, : self.visible], self.values[layer_idx][
                :, :, : self.visible
            ]
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def put_rows(self, rows: torch.Tensor, source: StaticKVCache) -> None:
        """Overwrite the first columns of `rows` with all of `source`'s (one row each)."""
        width = source.keys[0].shape[2]
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            for layer, block in zip(mine, theirs, strict=True):
                layer[rows, :, :width] = block

    @classmethod
    def moved_rows(cls, source: StaticKVCache, rows: torch.Tensor) -> StaticKVCache:
        """A cache of `rows` of `source`, freeing each source layer once copied: while a batch
        shrinks, memory peaks one layer above the old cache, not at two whole caches."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = [], []
        for mine, theirs in ((cache.keys, source.keys), (cache.values, source.values)):
            for i in range(len(theirs)):
                mine.append(theirs[i].index_select(0, rows))
                theirs[i] = None
        mark_dynamic(*cache.keys, *cache.values, dims=(0, 2))
        cache.write_cols = source.write_cols.clone()
        cache.per_row, cache.visible, cache.seen = source.per_row, None, source.seen
        return cache


GROUPED_ATTENTION = "entroflow_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """sdpa for decoding with grouped-query attention, without copying K/V per query head.

    query (B, Hq, Q, d), key/value (B, Hkv, L, d), attention_mask bool (B, 1, Q, L).
    At Q = 1 the Hq/Hkv query heads that share a K/V head become rows of one query block, so
    each K/V column is read once (transformers repeats K/V for every query head when a mask is
    given: 7x the cache traffic for Qwen2.5-0.5B). Prefill (Q > 1) repeats K/V as usual.
    Returns (B, Q, Hq, d), None like transformers' attention functions.
    """
    if attention_mask is None:  # a model whose forward dropped our mask: never attend blindly
        raise RuntimeError(
            f"{type(module).__name__} did not pass the static decoder's attention mask through; "
            "decode this model with `decoder: generate`"
        )
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    if q_len == 1 and groups > 1:
        grouped = query.reshape(batch, key.shape[1], groups, dim)  # head h uses K/V h // groups
        out = torch.nn.functional.scaled_dot_product_attention(
            grouped, key, value, attn_mask=attention_mask, scale=scaling
        )  # (B, Hkv, groups, d); the (B, 1, 1, L) mask broadcasts over the group rows
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling
    )  # (B, Hq, Q, d)
    return out.transpose(1, 2), None


AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
