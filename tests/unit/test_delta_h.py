"""ΔH and δH₁ against an exact-enumeration oracle, and the AdamW replay against torch."""

import itertools

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from entroflow.adam import dot, replay_adamw
from entroflow.delta_h import (
    entropy_value,
    first_order_surrogate,
    fit_loglog,
    functional_values,
    score_sequences,
    shifted,
    snis_delta,
)
from tests.conftest import float64_norms

VOCAB, EOS, PAD, MAX_LEN = 5, 4, 0, 3
PROMPT = [1, 2]


@pytest.fixture(scope="module")
def oracle_model():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # far from uniform
    return float64_norms(model)  # float32 norms would dominate the finite differences below


def all_sequences():
    """Every response: stops at EOS or at MAX_LEN tokens (85 sequences)."""
    out = []
    for n in range(1, MAX_LEN + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if EOS in seq[:-1]:
                continue
            if n < MAX_LEN and seq[-1] != EOS:
                continue
            out.append(list(seq))
    return out


SEQS = all_sequences()


def scores(model, seqs):
    return score_sequences(model, [PROMPT] * len(seqs), seqs, pad_token_id=PAD, temperature=1.0)


def exact_entropy(model, estimator, per_token):
    with torch.no_grad():
        sc = scores(model, SEQS)
    h, s, lengths = functional_values(sc, estimator)
    p = np.exp(s)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)  # the enumeration covers every outcome
    return entropy_value(h, lengths, p, per_token), p


def direction(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}


@pytest.mark.parametrize("estimator", ["rb", "surprisal"])
@pytest.mark.parametrize("per_token", [False, True])
def test_first_order_equals_exact_derivative(oracle_model, estimator, per_token):
    v = direction(oracle_model)
    h0, p = exact_entropy(oracle_model, estimator, per_token)
    eps = 1e-5
    with shifted(oracle_model, v, eps):
        h_plus, _ = exact_entropy(oracle_model, estimator, per_token)
    with shifted(oracle_model, v, -eps):
        h_minus, _ = exact_entropy(oracle_model, estimator, per_token)
    fd = (h_plus - h_minus) / (2 * eps)
    params = dict(oracle_model.named_parameters())
    for leave_one_out in (False,):  # exact weights: a constant baseline
        sc = scores(oracle_model, SEQS)
        surrogate = first_order_surrogate(sc, p, estimator, per_token, leave_one_out)
        grads = torch.autograd.grad(surrogate, [params[n] for n in v])
        predicted = dot(dict(zip(v, grads, strict=True)), v)
        assert predicted == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert abs(fd) > 1e-3  # a direction that really changes the entropy


@pytest.mark.parametrize("per_token", [False, True])
def test_snis_with_exact_weights_is_exact(oracle_model, per_token):
    v = direction(oracle_model, seed=2)
    eta = 0.05
    with torch.no_grad():
        h_old, s_old, lengths = functional_values(scores(oracle_model, SEQS), "rb")
        with shifted(oracle_model, v, eta):
            h_new, s_new, _ = functional_values(scores(oracle_model, SEQS), "rb")
    truth = entropy_value(h_new, lengths, np.exp(s_new), per_token) - entropy_value(
        h_old, lengths, np.exp(s_old), per_token
    )
    res = snis_delta(h_old, h_new, s_new - s_old, lengths, np.exp(s_old), per_token)
    assert res.delta == pytest.approx(truth, rel=1e-10, abs=1e-12)
    assert abs(truth) > 1e-3


def test_shift_restores_parameters_bit_exactly(oracle_model):
    before = {n: p.detach().clone() for n, p in oracle_model.named_parameters()}
    with shifted(oracle_model, direction(oracle_model), 0.3):
        assert not torch.equal(before["lm_head.weight"], oracle_model.lm_head.weight)
    for n, p in oracle_model.named_parameters():
        assert torch.equal(before[n], p)


@pytest.mark.parametrize("estimator", ["rb", "surprisal"])
def test_snis_converges_to_exact_delta_h(oracle_model, estimator):
    v = direction(oracle_model, seed=3)
    eta = 0.05
    with torch.no_grad():
        h_all, s_all, l_all = functional_values(scores(oracle_model, SEQS), estimator)
        with shifted(oracle_model, v, eta):
            h_new_all, s_new_all, _ = functional_values(scores(oracle_model, SEQS), estimator)
    p = np.exp(s_all)
    truth = entropy_value(h_new_all, l_all, np.exp(s_new_all), False) - entropy_value(
        h_all, l_all, p, False
    )
    rng = np.random.default_rng(0)
    errors = []
    for n in (100, 10_000):
        idx = rng.choice(len(SEQS), size=n, p=p / p.sum())  # y ~ π_θ
        res = snis_delta(
            h_all[idx],
            h_new_all[idx],
            s_new_all[idx] - s_all[idx],
            l_all[idx],
            np.ones(n),
            False,
            bootstrap=50,
        )
        errors.append(abs(res.delta - truth))
        assert res.ess > 0.5 * n
    assert errors[1] < 4 * res.stderr + 1e-4  # within the bootstrap error at N = 10,000
    assert errors[1] < errors[0] or errors[0] < 1e-4


def test_adamw_replay_matches_torch_step():
    torch.manual_seed(0)
    params = {
        "a": torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
        "b": torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
    }
    opt = torch.optim.AdamW(params.values(), lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(3):  # build up a non-trivial state
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
    state = {
        name: {
            **{k: v.clone() for k, v in opt.state[p].items()},
            **{k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")},
        }
        for name, p in params.items()
    }
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    theta0 = {name: p.detach().clone() for name, p in params.items()}
    step = replay_adamw(theta0, grads, state)
    for name, p in params.items():
        p.grad = grads[name].clone()
    opt.step()
    for name, p in params.items():
        torch.testing.assert_close(
            (p.detach() - theta0[name]) / 3e-3, step.direction[name], atol=1e-10, rtol=1e-9
        )
        torch.testing.assert_close(
            step.gradient_part[name] + step.remainder[name], step.direction[name]
        )
    assert step.lr == pytest.approx(3e-3)


def test_loglog_fit():
    eta = np.array([1e-3, 1e-2, 1e-1])
    slope, r2 = fit_loglog(eta, 5 * eta)
    assert slope == pytest.approx(1.0) and r2 == pytest.approx(1.0)
    slope, _ = fit_loglog(eta, -(eta**2))
    assert slope == pytest.approx(2.0)
