"""Per-sequence gradients, the blocked kernel, its reconstruction identity, and the sketch."""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from entroflow.estimators.adam import dot, replay_adamw
from entroflow.estimators.delta_h import first_order_surrogate, score_sequences
from entroflow.estimators.fisher import (
    flatten_blocks,
    jl_sketch,
    kernel_blocked,
    kernel_delta_h,
    sequence_gradients,
)
from entroflow.estimators.fisher_sketch import (
    FactoredSketch,
    cosine_error_rms,
    preconditioner_error,
)
from entroflow.training.algorithms import rl_loss
from tests.conftest import float64_norms

PAD = 0


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    base = Qwen3ForCausalLM(config).double().eval()
    float64_norms(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero; give it values so every gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.double()


def lora_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def batch(seed, n):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 40, rng.integers(2, 5)).tolist() for _ in range(n)]
    responses = [rng.integers(1, 40, rng.integers(1, 7)).tolist() for _ in range(n)]
    return prompts, responses


def gather(model, prompts, responses, names, max_tokens):
    out = {n: [None] * len(prompts) for n in names}
    for idx, grads in sequence_gradients(
        model,
        prompts,
        responses,
        names,
        pad_token_id=PAD,
        temperature=1.0,
        max_tokens_per_batch=max_tokens,
    ):
        for n in names:
            for j, i in enumerate(idx):
                out[n][i] = grads[n][j]
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("max_tokens", [10_000, 20])
def test_hook_gradients_equal_one_backward_per_sequence(lora_model, max_tokens):
    names = lora_names(lora_model)
    prompts, responses = batch(1, 6)
    hooked = gather(lora_model, prompts, responses, names, max_tokens)
    params = dict(lora_model.named_parameters())
    for i in range(len(prompts)):  # the slow path: each sequence alone, plain autograd
        sc = score_sequences(
            lora_model, [prompts[i]], [responses[i]], pad_token_id=PAD, temperature=1.0
        )
        grads = torch.autograd.grad(sc.logprob[0].sum(), [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            torch.testing.assert_close(hooked[n][i], g.double(), atol=1e-10, rtol=1e-8)


def test_hook_gradients_in_float32_match_autograds_float32_gradients(lora_model):
    """A float32 model's per-sequence gradients are accumulated in float32, as autograd's own."""
    model = copy.deepcopy(lora_model).float()
    names = lora_names(model)
    prompts, responses = batch(2, 5)
    hooked = gather(model, prompts, responses, names, 10_000)
    params = dict(model.named_parameters())
    for i in range(len(prompts)):
        sc = score_sequences(model, [prompts[i]], [responses[i]], pad_token_id=PAD, temperature=1.0)
        grads = torch.autograd.grad(sc.logprob[0].sum(), [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            assert hooked[n].dtype == torch.float64
            torch.testing.assert_close(hooked[n][i], g.double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 7, 100, 10_000])
def test_blocked_kernel_equals_dense(block):
    rng = np.random.default_rng(0)
    g_e, g_u = (
        torch.as_tensor(rng.normal(size=(5, 333))),
        torch.as_tensor(rng.normal(size=(4, 333))),
    )
    torch.testing.assert_close(kernel_blocked(g_e, g_u, block), g_e @ g_u.T, atol=1e-10, rtol=1e-12)


def test_reconstruction_identity(lora_model):
    """K's coefficient-weighted row sums reproduce the aggregate first order (gradient part)."""
    names = lora_names(lora_model)
    params = dict(lora_model.named_parameters())
    e_prompts, e_responses = batch(2, 7)
    u_prompts, u_responses = batch(3, 8)
    advantages = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 0.3])
    max_new = 6
    rng = np.random.default_rng(4)
    state = {
        n: {
            "exp_avg": torch.as_tensor(rng.normal(size=tuple(params[n].shape)) * 1e-3),
            "exp_avg_sq": torch.as_tensor(rng.random(size=tuple(params[n].shape)) * 1e-5),
            "step": 5.0,
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
        }
        for n in names
    }
    u_scores = score_sequences(
        lora_model, u_prompts, u_responses, pad_token_id=PAD, temperature=1.0
    )
    loss = rl_loss(u_scores, advantages, "dr_grpo", max_new)
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))
    step = replay_adamw({n: params[n].detach() for n in names}, grads, state)
    e_scores = score_sequences(
        lora_model, e_prompts, e_responses, pad_token_id=PAD, temperature=1.0
    )
    surrogate = first_order_surrogate(
        e_scores, np.ones(7), "surprisal", per_token=False, leave_one_out=True
    )
    grad_h = dict(
        zip(names, torch.autograd.grad(surrogate, [params[n] for n in names]), strict=True)
    )
    aggregate = dot(grad_h, step.gradient_part)

    sqrt_p = {n: step.denominator[n].double().rsqrt() for n in names}  # √P, applied once per side
    g_e = flatten_blocks(gather(lora_model, e_prompts, e_responses, names, 10_000), names, sqrt_p)
    g_u = flatten_blocks(gather(lora_model, u_prompts, u_responses, names, 10_000), names, sqrt_p)
    kernel = kernel_blocked(g_e, g_u, block=50)
    s_eval = np.array([float(lp.sum()) for lp in e_scores.logprob])
    t = 6.0
    adam_factor = (1 - 0.9) / (1 - 0.9**t)
    from_kernel, per_sequence = kernel_delta_h(
        kernel, s_eval, advantages / (8 * max_new), adam_factor
    )
    assert from_kernel == pytest.approx(aggregate, rel=1e-6)
    assert per_sequence[6] == 0.0 and abs(aggregate) > 1e-8  # zero advantage contributes nothing


def test_sketch_error_shrinks_with_k():
    rng = np.random.default_rng(0)
    g_e, g_u = (
        torch.as_tensor(rng.normal(size=(6, 4000))),
        torch.as_tensor(rng.normal(size=(5, 4000))),
    )
    exact = g_e @ g_u.T
    errors = []
    for k in (16, 256, 4096):
        sketch = jl_sketch(g_e, k, seed=1) @ jl_sketch(g_u, k, seed=1).T
        errors.append(float((sketch - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 3 * errors[0] / np.sqrt(4096 / 16)  # ~1/√k


# ---- the factored sketch (estimators.fisher_sketch) -------------------------------------------


def exact_rows(model, prompts, responses, names, sqrt_p):
    return flatten_blocks(gather(model, prompts, responses, names, 10_000), names, sqrt_p)


def positive_sqrt_p(model, names, seed, rank_one=False):
    """A positive √P per weight: rank one (a bᵀ) or general (log-normal entries)."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        shape = tuple(params[n].shape)
        if rank_one:
            p = np.outer(rng.uniform(0.5, 2, shape[0]), rng.uniform(0.5, 2, shape[1]))
        else:
            p = np.exp(rng.normal(0, 0.5, shape))
        out[n] = torch.as_tensor(p)
    return out


def sketch_kernel(model, names, sqrt_p, e, u, **kw):
    sk = FactoredSketch(model, names, sqrt_p=sqrt_p, dtype=torch.float64, **kw)
    run = dict(pad_token_id=PAD, temperature=1.0, max_tokens_per_batch=20)
    return sk.sketch_all(model, *e, **run) @ sk.sketch_all(model, *u, **run).T, sk


@pytest.fixture(scope="module")
def exact_case(lora_model):
    names = lora_names(lora_model)
    e, u = batch(5, 7), batch(6, 6)
    sqrt_p = positive_sqrt_p(lora_model, names, 0)
    g_e, g_u = (exact_rows(lora_model, *s, names, sqrt_p) for s in (e, u))
    return names, e, u, sqrt_p, g_e @ g_u.T, g_e.norm(dim=1).numpy(), g_u.norm(dim=1).numpy()


def test_sketch_without_projection_is_the_exact_kernel(lora_model, exact_case):
    """k at least every layer's sides: identity projections; exact P gives K itself."""
    names, e, u, sqrt_p, kernel, _, _ = exact_case
    approx, sk = sketch_kernel(
        lora_model, names, sqrt_p, e, u, k_in=0, k_out=0, preconditioner="exact"
    )
    assert sk.dim == sum(p.numel() for n, p in lora_model.named_parameters() if n in names)
    torch.testing.assert_close(approx, kernel, atol=1e-10, rtol=1e-8)


def test_factored_preconditioner_is_exact_when_p_is_rank_one(lora_model, exact_case):
    names, e, u, _, _, _, _ = exact_case
    sqrt_p = positive_sqrt_p(lora_model, names, 1, rank_one=True)
    g_e, g_u = (exact_rows(lora_model, *s, names, sqrt_p) for s in (e, u))
    factored, _ = sketch_kernel(lora_model, names, sqrt_p, e, u, k_in=0, k_out=0, rank=1)
    torch.testing.assert_close(factored, g_e @ g_u.T, atol=1e-10, rtol=1e-8)
    # with projections too (and no random signs): the factored and exact-P sketches are the same
    proj = dict(k_in=4, k_out=4, seed=3)
    exact_p, _ = sketch_kernel(
        lora_model, names, sqrt_p, e, u, preconditioner="exact", random_signs=False, **proj
    )
    factored, _ = sketch_kernel(lora_model, names, sqrt_p, e, u, rank=1, **proj)
    torch.testing.assert_close(factored, exact_p, atol=1e-10, rtol=1e-8)


def test_factored_preconditioner_error_falls_with_rank(lora_model, exact_case):
    """General (log-normal) √P: rank 1 is an approximation whose error is measured; full rank is
    exact."""
    names, e, u, sqrt_p, kernel, n_e, n_u = exact_case
    errors = []
    for rank in (1, 2, 16):
        approx, _ = sketch_kernel(lora_model, names, sqrt_p, e, u, k_in=0, k_out=0, rank=rank)
        errors.append(cosine_error_rms(approx, kernel, n_e, n_u))
    assert 0.01 < errors[0] < 0.15  # log-normal σ = 0.5 entries: 0.054 in cosine units
    assert errors[1] < errors[0] and errors[2] < 1e-10
    assert preconditioner_error(sqrt_p[names[0]], 1) > preconditioner_error(sqrt_p[names[0]], 2)


def test_sketch_error_falls_with_k(lora_model, exact_case):
    """Exact P, projected sides of k = 2, 4, 8 (the tiny model's wide sides are 8-32): the
    cosine-unit error, averaged over 6 seeds, falls with k, roughly as 1/√k."""
    names, e, u, sqrt_p, kernel, n_e, n_u = exact_case
    errors = []
    for k in (2, 4, 8):
        errs = [
            cosine_error_rms(
                sketch_kernel(
                    lora_model,
                    names,
                    sqrt_p,
                    e,
                    u,
                    k_in=k,
                    k_out=k,
                    seed=s,
                    preconditioner="exact",
                )[0],
                kernel,
                n_e,
                n_u,
            )
            for s in range(6)
        ]
        errors.append(float(np.mean(errs)))
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 0.6 * errors[0]  # measured 0.27, 0.14, 0.10


def test_random_signs_lower_the_sketch_error(lora_model, exact_case):
    """Exact P at k = 8: ±1 signs folded into √P give each row of LoRA's unprojected side its own
    projection; over 10 seeds the error is lower than with one shared projection (measured 0.068
    against 0.090)."""
    names, e, u, sqrt_p, kernel, n_e, n_u = exact_case

    def mean_error(random_signs):
        return np.mean(
            [
                cosine_error_rms(
                    sketch_kernel(
                        lora_model,
                        names,
                        sqrt_p,
                        e,
                        u,
                        k_in=8,
                        k_out=8,
                        seed=s,
                        preconditioner="exact",
                        random_signs=random_signs,
                    )[0],
                    kernel,
                    n_e,
                    n_u,
                )
                for s in range(10)
            ]
        )

    assert mean_error(True) < 0.9 * mean_error(False)


def test_stage_streams_the_factored_sketch(lora_model, exact_case, tmp_path):
    """The Fisher stage's factored sketch (from the formed per-sequence gradients) is the one the
    estimator makes from layer inputs and output gradients, and its row norms are ‖√P ⊙ ∇S‖."""
    import h5py

    from entroflow.checkpoint.fisher_run import factored_sketch, stream_gradients
    from entroflow.checkpoint.settings import FisherSettings

    names, e, _, sqrt_p, _, n_e, _ = exact_case
    settings = FisherSettings(sketch="factored", sketch_side=4, seed=2, max_tokens_per_batch=20)
    factored = factored_sketch(lora_model, sqrt_p, settings)
    with h5py.File(tmp_path / "g.h5", "w") as store:
        sketch, norms = stream_gradients(
            lora_model, *e, names, sqrt_p, store, "e", settings, PAD, 1.0, factored=factored
        )
    direct = factored.sketch_all(
        lora_model, *e, pad_token_id=PAD, temperature=1.0, max_tokens_per_batch=20
    )
    np.testing.assert_allclose(sketch, direct.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(norms, n_e, rtol=1e-10)
    assert factored_sketch(lora_model, sqrt_p, FisherSettings(sketch="jl")) is None
