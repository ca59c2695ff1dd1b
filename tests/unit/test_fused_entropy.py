"""The fused Triton entropy kernel against float64 logits made in full.

Without CUDA it runs in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the kernel's logic is tested on every machine; the CUDA test checks the
compiled kernel at a real model's shape where a GPU exists.
"""

import numpy as np
import pytest
import torch

from entroflow.lm import fused_entropy
from entroflow.lm.fused_entropy import (
    fused_entropy_and_logprob,
    logits_entropy,
    merge_partials,
    sample_with_entropy,
    split_vocabulary,
)
from entroflow.lm.scoring import choose_head_method, score_responses
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(
    not fused_entropy.fused_supported(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(hidden, weight, labels, temperature):
    """float64 logits made in full. H = log1p(r) - b/(1+r) with r = Σ_{i≠top} e^{z_i-max} and
    b = Σ (z_i-max) e^{z_i-max}: -Σ p log p loses r where r < 1e-16 (p_top rounds to 1)."""
    z = (hidden.double() @ weight.double().T) / temperature  # (R, V)
    d = z - z.max(-1, keepdim=True).values
    e = d.exp().scatter(-1, d.argmax(-1, keepdim=True), 0.0)  # the top token's 1 left out
    r, b = e.sum(-1), (d * e).sum(-1)
    h = torch.log1p(r) - b / (1 + r)
    return h, None if labels is None else (d - torch.log1p(r)[:, None]).gather(
        -1, labels[:, None]
    ).squeeze(-1)


def make_inputs(rows, width, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g)
    hidden[::7] *= 25  # near-deterministic rows: entropy ~1e-10, where log Z - E[z] would cancel
    weight = torch.randn(vocab, width, generator=g) * 0.5
    labels = torch.randint(0, vocab, (rows,), generator=g)
    return hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("cols_per_split", [32, 300, 4096])
def test_matches_float64_reference(dtype, temperature, cols_per_split):
    hidden, weight, labels = make_inputs(37, 40, 1000, dtype)  # V = 1000: last tile is partial
    h, lp = fused_entropy_and_logprob(
        hidden, weight, labels, temperature=temperature, cols_per_split=cols_per_split
    )
    h_ref, lp_ref = reference(hidden, weight, labels, temperature)
    assert h.dtype == torch.float32 and h.shape == (37,)
    # Logits are accumulated in fp32 from the (rounded) inputs; the reference uses the same inputs.
    torch.testing.assert_close(h.double(), h_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-4, rtol=1e-5)
    tiny = h_ref < 1e-6  # relative accuracy where the entropy is almost zero (down to 1e-23)
    assert tiny.any()
    torch.testing.assert_close(h.double()[tiny], h_ref[tiny], atol=0, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_entropy_of_existing_logits(dtype, temperature):
    """The decode-step kernel (logits already exist) against the same float64 reference."""
    hidden, weight, _ = make_inputs(9, 16, 1000, torch.float32)
    logits = (hidden @ weight.T).to(dtype)  # (9, 1000)
    identity = torch.eye(1000, dtype=torch.float64, device=DEVICE)  # logits @ I = logits
    h_ref = reference(logits.double(), identity, None, temperature)[0]
    h = logits_entropy(logits, temperature).double()
    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
    tiny = h_ref < 1e-6
    assert tiny.any() or temperature == 1.0  # at 0.6 the scaled rows are near-deterministic
    torch.testing.assert_close(h[tiny], h_ref[tiny], atol=0, rtol=1e-3)


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampler_log_prob_and_entropy(temperature):
    """The sampling kernel's log-prob of its own draw and entropy, against float64."""
    hidden, weight, _ = make_inputs(9, 16, 1000, torch.float32)
    logits = hidden @ weight.T  # (9, 1000)
    tokens, logprob, entropy = sample_with_entropy(logits, temperature, seed=3)
    identity = torch.eye(1000, dtype=torch.float64, device=DEVICE)
    h_ref, lp_ref = reference(logits.double(), identity, tokens, temperature)
    torch.testing.assert_close(entropy.double(), h_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logprob.double(), lp_ref, atol=2e-5, rtol=1e-5)
    again, logprob_again, none = sample_with_entropy(logits, temperature, 3, with_entropy=False)
    assert none is None and torch.equal(again, tokens) and torch.equal(logprob_again, logprob)
    assert not torch.equal(sample_with_entropy(logits * 0.01, temperature, 4)[0], tokens)


def test_sampler_ignores_masked_out_tokens():
    """Logits at -inf (or finfo.min, -inf once divided by T < 1) carry no mass and are never drawn."""
    hidden, weight, _ = make_inputs(6, 16, 300, torch.float32)
    logits = hidden @ weight.T  # (6, 300)
    logits[:, ::3] = float("-inf")
    logits[:3, 1::3] = torch.finfo(torch.float32).min
    tokens, logprob, entropy = sample_with_entropy(logits, 0.5, seed=1)
    logp = torch.log_softmax(logits.double() / 0.5, -1)  # (6, 300), float64, -inf kept
    h_ref = -torch.special.xlogy(logp.exp(), logp.exp()).sum(-1)
    lp_ref = logp.gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(entropy.double(), h_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logprob.double(), lp_ref, atol=2e-5, rtol=1e-5)
    assert (tokens % 3 == 2)[:3].all() and (tokens % 3 != 0).all()


def test_sampler_draws_from_softmax_at_temperature():
    """1,024 draws from one row of 10 logits at T = 0.8 against softmax(z / T): Pearson's χ²
    (fixed seeds, so the test is deterministic; 26.12 is χ²(8)'s 99.9% quantile)."""
    z = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -3.0])
    rows = z.expand(256, 10).contiguous().to(DEVICE)
    tokens = torch.cat([sample_with_entropy(rows, 0.8, seed)[0] for seed in (7, 8, 9, 10)])
    counts = torch.bincount(tokens.cpu(), minlength=10).double()
    expected = torch.softmax(z.double() / 0.8, -1) * len(tokens)
    pool = lambda x: torch.cat([x[:8], x[8:].sum(0, keepdim=True)])  # noqa: E731  tail < 5
    counts, expected = pool(counts), pool(expected)
    assert (expected >= 5).all()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.12, (counts.tolist(), expected.tolist())
    tempered_wrong = torch.softmax(z.double(), -1) * len(tokens)  # T ignored: fits worse
    assert ((counts - pool(tempered_wrong)) ** 2 / pool(tempered_wrong)).sum().item() > chi2


def test_without_labels_and_edge_sizes():
    hidden, weight, _ = make_inputs(1, 24, 5, torch.float32)  # one row, vocab smaller than a tile
    h, lp = fused_entropy_and_logprob(hidden, weight)
    assert lp is None
    torch.testing.assert_close(
        h.double(), reference(hidden, weight, None, 1.0)[0], atol=2e-6, rtol=0
    )
    empty, _ = fused_entropy_and_logprob(hidden[:0], weight)
    assert empty.shape == (0,)


def test_row_chunks_for_int32_offsets(monkeypatch):
    hidden, weight, labels = make_inputs(37, 16, 100, torch.float32)
    whole = fused_entropy_and_logprob(hidden, weight, labels)
    monkeypatch.setattr(fused_entropy, "INT32_LIMIT", 16 * 1024)  # -> chunks of 1,024 rows
    assert fused_entropy.INT32_LIMIT // 16 // 1024 * 1024 == 1024
    big = hidden.repeat(30, 1)  # 1,110 rows: two chunks
    h, lp = fused_entropy_and_logprob(big, weight, labels.repeat(30))
    # A wrong chunk offset would be off by O(1); within a chunk, the interpreter's fp32 dot may
    # round differently per block height (6.8e-6 seen with numpy 2.4): the kernel's tolerance.
    torch.testing.assert_close(h, whole[0].repeat(30), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(lp, whole[1].repeat(30), atol=2e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="int32"):
        fused_entropy_and_logprob(hidden, torch.zeros(1100, 16))


def test_bad_input_is_refused():
    hidden, weight, labels = make_inputs(4, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        fused_entropy_and_logprob(hidden, weight, temperature=0)
    with pytest.raises(ValueError, match="weight"):
        fused_entropy_and_logprob(hidden, weight[:, :8])
    with pytest.raises(ValueError, match="labels"):
        fused_entropy_and_logprob(hidden, weight, labels[:3])


@pytest.mark.parametrize("tiles,target", [(1187, 32), (1187, 8), (3, 32), (1, 1), (100, 7)])
def test_vocabulary_split_covers_every_tile(tiles, target):
    per_split, splits = split_vocabulary(tiles, target)
    assert per_split <= max(1, target) and per_split * splits >= tiles
    assert per_split * (splits - 1) < tiles  # no split is wholly past the vocabulary


def test_merging_splits_is_exact_up_to_rounding():
    z = torch.randn(5, 64, dtype=torch.float64) * 6  # (R, V) logits, cut into 4 splits of 16
    parts = z.reshape(5, 4, 16).transpose(0, 1)  # (S, R, 16)
    m = parts.max(-1).values
    e = torch.exp(parts - m[..., None])
    h, _ = merge_partials(m, e.sum(-1) - 1, ((parts - m[..., None]) * e).sum(-1), None)
    logp = torch.log_softmax(z, -1)
    torch.testing.assert_close(h, -(logp.exp() * logp).sum(-1), atol=1e-12, rtol=0)


def test_scorer_fused_head_matches_chunked_and_float64(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=7).to(DEVICE)
    rng = np.random.default_rng(3)
    vocab = len(tiny_tokenizer)
    prompts = [rng.integers(3, vocab, rng.integers(1, 9)).tolist() for _ in range(5)]
    responses = [rng.integers(3, vocab, rng.integers(1, 12)).tolist() for _ in range(5)]
    kwargs = dict(pad_token_id=tiny_tokenizer.pad_token_id, temperature=0.8)
    fused = score_responses(model, prompts, responses, head_method="fused", **kwargs)
    chunked = score_responses(model, prompts, responses, head_method="chunked", **kwargs)
    body = model.model
    for p, r, f, c in zip(prompts, responses, fused, chunked, strict=True):
        np.testing.assert_allclose(f.entropy, c.entropy, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(f.logprob, c.logprob, atol=2e-5, rtol=1e-5)
        with torch.no_grad():
            hidden = body(input_ids=torch.tensor([p + r], device=DEVICE)).last_hidden_state[0]
            h_ref, lp_ref = reference(
                hidden[len(p) - 1 : -1], model.lm_head.weight, torch.tensor(r, device=DEVICE), 0.8
            )
        np.testing.assert_allclose(f.entropy, h_ref.cpu().numpy(), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(f.logprob, lp_ref.cpu().numpy(), atol=2e-5, rtol=1e-5)


def test_head_method_choice(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    cpu = torch.device("cpu")
    assert choose_head_method(model, cpu, "auto") == "chunked"  # auto fuses on CUDA only
    if fused_entropy.interpreting():
        assert choose_head_method(model, cpu, "fused") == "fused"
    with pytest.raises(ValueError, match="gradients"):
        choose_head_method(model, cpu, "fused", needs_grad=True)
    with pytest.raises(ValueError, match="float64"):
        choose_head_method(model, cpu, "fused", accum_dtype=torch.float64)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        choose_head_method(model, cpu, "fused")
    with pytest.raises(ValueError, match="unknown head method"):
        choose_head_method(model, cpu, "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernel)")
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_cuda_kernel_at_qwen_shape(temperature):
    """bf16, hidden 896, vocab 151,936 (Qwen2.5-0.5B's head) against float64 logits."""
    hidden, weight, labels = make_inputs(300, 896, 151_936, torch.bfloat16)
    hidden = hidden / 3
    h, lp = fused_entropy_and_logprob(hidden, weight, labels, temperature=temperature)
    h_ref, lp_ref = [], []
    for start in range(0, 300, 50):
        sl = slice(start, start + 50)
        a, b = reference(hidden[sl], weight, labels[sl], temperature)
        h_ref.append(a)
        lp_ref.append(b)
    torch.testing.assert_close(h.double(), torch.cat(h_ref), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp.double(), torch.cat(lp_ref), atol=1e-3, rtol=1e-5)
