"""Entropy and log-prob against a float64 unchunked reference."""

import math

import pytest
import torch

from entroflow.lm.entropy import entropy_and_logprob


def reference(logits, labels, temperature):
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    h = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    return h, logp.gather(-1, labels[..., None]).squeeze(-1)


def make_logits(rows, vocab, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype)


def tolerance(dtype):
    # Inputs are cast once; accumulation is fp32, so errors are fp32 rounding over V terms.
    return {"atol": 2e-4, "rtol": 1e-4}


@pytest.mark.parametrize("vocab", [7, 1000, 151_936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_matches_float64_reference(vocab, dtype, temperature):
    rows = 6 if vocab > 10_000 else 37
    logits = make_logits(rows, vocab, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    kwargs = {"chunk_rows": 5}
    h, lp = entropy_and_logprob(logits, labels, temperature=temperature, **kwargs)
    h_ref, lp_ref = reference(logits, labels, temperature)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), h_ref, **tolerance(dtype))
    torch.testing.assert_close(lp.double(), lp_ref, **tolerance(dtype))


@pytest.mark.parametrize("chunk", [1, 3, 64, 10_000])
def test_chunk_size_does_not_change_values(chunk):
    logits = make_logits(50, 513, torch.float32)
    labels = torch.randint(0, 513, (50,))
    h1, lp1 = entropy_and_logprob(logits, labels, chunk_rows=chunk)
    h2, lp2 = entropy_and_logprob(logits, labels, chunk_rows=50)
    torch.testing.assert_close(h1, h2, atol=0, rtol=0)
    torch.testing.assert_close(lp1, lp2, atol=0, rtol=0)


def test_extreme_rows():
    vocab = 300
    neg_inf = float("-inf")
    rows = torch.zeros(5, vocab)
    rows[0, :] = neg_inf
    rows[0, 3] = 0.0  # exactly one allowed token: H = 0
    rows[1, 200:] = neg_inf  # masked tail: uniform over 200
    rows[2, 7] = 1e4  # one-hot-like
    rows[3] = torch.linspace(-80, 80, vocab)  # huge dynamic range
    rows[4, ::2] = neg_inf  # alternate masking, remaining uniform over 150
    labels = torch.tensor([3, 5, 7, vocab - 1, 1])
    kwargs = {"chunk_rows": 2}
    h, lp = entropy_and_logprob(rows, labels, **kwargs)
    assert torch.isfinite(h).all() and torch.isfinite(lp).all()
    assert h[0].item() == pytest.approx(0.0, abs=1e-7)
    assert lp[0].item() == pytest.approx(0.0, abs=1e-7)
    assert h[1].item() == pytest.approx(math.log(200), abs=1e-5)
    assert h[2].item() == pytest.approx(0.0, abs=1e-7)
    assert h[4].item() == pytest.approx(math.log(150), abs=1e-5)
    h_ref, lp_ref = reference(rows, labels, 1.0)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.double(), lp_ref, atol=1e-5, rtol=1e-5)


def test_near_deterministic_rows_keep_relative_accuracy():
    """Entropies down to ~1e-20: float64 -Σ p log p rounds p_top to 1 there, so the exact value
    comes from r = Σ_{i≠top} e^(z_i - max) and b = Σ (z_i - max) e^(z_i - max) in float64."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(20, 1000, generator=g, dtype=torch.float64)
    z[:, 0] += torch.linspace(10, 50, 20, dtype=torch.float64)  # gaps of 10..50 nats
    d = z - z.max(-1, keepdim=True).values
    e = d.exp().scatter(-1, d.argmax(-1, keepdim=True), 0.0)
    r, b = e.sum(-1), (d * e).sum(-1)
    exact = torch.log1p(r) - b / (1 + r)
    h, _ = entropy_and_logprob(z.float(), chunk_rows=7)
    assert exact.min() < 1e-16
    torch.testing.assert_close(h.double(), exact, atol=0, rtol=1e-4)


def test_uniform_is_log_vocab_and_shapes_are_kept():
    logits = torch.zeros(2, 3, 50)
    h, lp = entropy_and_logprob(logits, torch.zeros(2, 3, dtype=torch.long))
    assert h.shape == (2, 3)
    torch.testing.assert_close(h, torch.full((2, 3), math.log(50)))
    torch.testing.assert_close(lp, torch.full((2, 3), -math.log(50)))


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        entropy_and_logprob(torch.zeros(1, 4), temperature=0.0)
