"""ΔH and δH₁ against an exact-enumeration oracle, and the AdamW replay against torch."""

import itertools

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from entroflow.estimators import delta_h_stats as st
from entroflow.estimators.adam import dot, replay_adamw
from entroflow.estimators.delta_h import (
    entropy_value,
    first_order_surrogate,
    fit_loglog,
    functional_values,
    score_sequences,
    shifted,
    snis_delta,
)
from entroflow.lm.tangents import score_with_tangent
from tests.conftest import float64_norms

VOCAB, EOS, PAD, MAX_LEN = 5, 4, 0, 3
PROMPT = [1, 2]


def oracle_config(vocab: int) -> Qwen3Config:
    """One layer, hidden 16: small enough for float64 oracles that sum over every response."""
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def oracle_model():
    torch.manual_seed(0)
    config = oracle_config(VOCAB)
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


# --- The ground truth and its intervals, against exact enumeration -----------------------------
# A larger oracle than above (vocabulary 6, up to 4 tokens: all 781 responses), sampled at the
# demo's E-batch sizes; every estimator works on resample counts over the 781 distinct responses,
# so one replication is one multinomial draw and its bootstrap a matrix of counts.

CAL_VOCAB, CAL_EOS, CAL_MAX_LEN = 6, 5, 4


def cal_sequences():
    out = []
    for n in range(1, CAL_MAX_LEN + 1):
        for seq in itertools.product(range(CAL_VOCAB), repeat=n):
            if CAL_EOS in seq[:-1] or (n < CAL_MAX_LEN and seq[-1] != CAL_EOS):
                continue
            out.append(list(seq))
    return out


@pytest.fixture(scope="module")
def calibration_oracle():
    """Per-token arrays and tangents at θ, and exact ΔH(η), H'(0) along one direction."""
    torch.manual_seed(0)
    config = oracle_config(CAL_VOCAB)
    model = float64_norms(Qwen3ForCausalLM(config).double().eval())
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    seqs = cal_sequences()
    assert len(seqs) == 781

    def score():
        return score_sequences(model, [PROMPT] * len(seqs), seqs, pad_token_id=PAD, temperature=1.0)

    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(3)
    v = {
        n: torch.randn(params[n].shape, generator=g, dtype=torch.float64)
        for n in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight")
    }
    jvp = score_with_tangent(score, model, v)
    arrays = st.TokenArrays.from_lists(jvp.entropy, jvp.logprob)
    tangent = st.Tangent.from_lists(jvp.d_entropy, jvp.d_logprob, arrays.mask.shape[1])
    h, s = arrays.values("rb"), arrays.logprob.sum(1)
    p = np.exp(s)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    eps, eta = 1e-5, 0.03
    exact = {}
    with torch.no_grad():
        for shift in (eps, -eps, eta):
            with shifted(model, v, shift):
                h_new, s_new, _ = functional_values(score(), "rb")
            exact[shift] = (h_new, s_new, float((np.exp(s_new) * h_new).sum() - (p * h).sum()))
    slope = (exact[eps][2] - exact[-eps][2]) / (2 * eps)
    return {
        "arrays": arrays,
        "tangent": tangent,
        "p": p / p.sum(),
        "eta": eta,
        "h_new": exact[eta][0],
        "log_ratio": exact[eta][1] - s,
        "delta_h": exact[eta][2],
        "slope": slope,
    }


def test_jvp_slope_with_exact_weights_equals_exact_derivative(calibration_oracle):
    o = calibration_oracle
    weights = o["p"][None, :] * 1e12  # counts ∝ π_θ: the leave-one-out correction vanishes
    slope = st.first_order_slope(o["arrays"], o["tangent"], weights, "rb", False)[0]
    assert slope == pytest.approx(o["slope"], rel=1e-6)
    d = o["arrays"].denominators(False)
    linear = st.snis_slope(
        o["arrays"].values("rb"), o["tangent"].values("rb"), o["tangent"].score, d, weights
    )[0]
    assert linear == pytest.approx(o["slope"], rel=1e-6)  # SNIS's linearisation: same derivative
    truth = st.snis(o["arrays"].values("rb"), o["h_new"], o["log_ratio"], d, weights)[0]
    assert truth == pytest.approx(o["delta_h"], rel=1e-9)
    assert abs(o["delta_h"] - o["eta"] * o["slope"]) > 0.3 * abs(o["delta_h"])  # nonlinear here


@pytest.mark.parametrize("n", [256, 2048])
def test_intervals_are_calibrated_against_exact_enumeration(calibration_oracle, n):
    """200 seeded E-batches of n responses (2048: the demo's first draws; 256: the default):
    every 95% interval covers its exact value in
    0.90-0.98 of them, and every estimator's bias is below a quarter of its standard error; so
    does the interval of δH₁'s relative error, where it exists (ΔH's interval excludes zero)."""
    o = calibration_oracle
    arrays, tangent, eta = o["arrays"], o["tangent"], o["eta"]
    a, d = arrays.values("rb"), arrays.denominators(False)
    targets = {
        "ground truth": o["delta_h"],
        "snis": o["delta_h"],
        "first order": eta * o["slope"],
        "nonlinearity": o["delta_h"] - eta * o["slope"],
    }
    rng = np.random.default_rng(0)
    found = {k: [] for k in targets}
    relative = []  # does Fieller's set for δH₁'s relative error -R / ΔH cover the exact value?
    relative_target = -targets["nonlinearity"] / targets["ground truth"]
    for _ in range(200):
        sample = rng.multinomial(n, o["p"]).astype(np.float64)
        counts = np.vstack([sample, rng.multinomial(n, sample / n, size=200)])
        snis = st.snis(a, o["h_new"], o["log_ratio"], d, counts)
        nonlinear = snis - eta * st.snis_slope(a, tangent.values("rb"), tangent.score, d, counts)
        first = eta * st.first_order_slope(arrays, tangent, counts, "rb", False)
        for key, reps in (
            ("ground truth", first + nonlinear),
            ("snis", snis),
            ("first order", first),
            ("nonlinearity", nonlinear),
        ):
            found[key].append(st.interval(reps))
        ratio = st.RatioInterval.from_replicates(-nonlinear, first + nonlinear)
        relative.append(ratio.contains(relative_target))
    for key, target in targets.items():
        est, se, lo, hi = np.array(found[key]).T
        coverage = np.mean((lo <= target) & (target <= hi))
        assert 0.90 <= coverage <= 0.98, (key, coverage)
        assert abs(est.mean() - target) < 0.25 * est.std(), (key, est.mean(), target)
        assert se.mean() == pytest.approx(est.std(), rel=0.2), key  # the s.e. is the real spread
    # Fieller's set, unconditionally (it is unbounded where ΔH's interval holds zero).
    assert 0.90 <= np.mean(relative) <= 0.98, np.mean(relative)


def test_covariance_predictor_interval_is_calibrated(calibration_oracle):
    """The covariance predictor's bootstrap interval, at the demo's U-batch size (64 sequences),
    covers the predictor's population value (exact expectations over all 781 responses, a fixed
    advantage per response) in 0.90-0.98 of 200 seeded batches, with bias below se / 4."""
    o = calibration_oracle
    arrays, tangent = o["arrays"], o["tangent"]
    log_p = arrays.logprob.sum(1)

    # A fixed advantage per response, as in training correlated with log π (likelier answers
    # are more often right) and with the step's log-prob change (the step ascends Σ A log π).
    # With both correlations near zero the predictor is a product of two near-zero estimates,
    # whose bootstrap variance overstates the spread (E[X̂²] = μ² + σ²; measured 1.55x).
    def z(x):
        return (x - x @ o["p"]) / np.sqrt((x - x @ o["p"]) ** 2 @ o["p"])

    noise = np.random.default_rng(7).normal(size=len(log_p))
    advantage = z(log_p) + z(tangent.score) + noise
    inputs = (log_p, arrays.lengths, tangent.score, advantage)
    target = st.covariance_predictor(*inputs, o["p"][None, :] * 1e12)[0]
    rng, found = np.random.default_rng(1), []
    for _ in range(200):
        sample = rng.multinomial(64, o["p"]).astype(np.float64)
        counts = np.vstack([sample, rng.multinomial(64, sample / 64, size=200)])
        found.append(st.interval(st.covariance_predictor(*inputs, counts)))
    est, se, lo, hi = np.array(found).T
    coverage = np.mean((lo <= target) & (target <= hi))
    assert 0.90 <= coverage <= 0.98, coverage
    assert abs(est.mean() - target) < 0.25 * est.std(), (est.mean(), target, est.std())


def test_ratio_interval_and_verdict():
    """Fieller's set from joint replicates: bounded where the denominator is clearly nonzero,
    unbounded (and never `confirmed`) where it is not; the verdict against ±0.2."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, 4000))

    def ratio(num, den, sd_num, sd_den):
        return st.RatioInterval.from_replicates(
            np.r_[num, num + sd_num * noise[0]], np.r_[den, den + sd_den * noise[1]]
        )

    tight = ratio(0.1, 1.0, 0.01, 0.01)
    lo, hi = tight.bounds
    assert lo < 0.1 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.01 * np.hypot(1, 0.1), rel=0.1)
    assert tight.contains(0.1) and not tight.contains(0.2)
    assert tight.verdict() == "confirmed"
    assert ratio(0.5, 1.0, 0.01, 0.01).verdict() == "rejected"
    assert ratio(-0.5, 1.0, 0.01, 0.01).verdict() == "rejected"
    assert ratio(0.15, 1.0, 0.05, 0.05).verdict() == "undecided"  # straddles 0.2
    # ΔH's interval holds zero but the nonlinearity is clearly larger than 0.2 |ΔH| anywhere in it.
    wide = ratio(0.01, 0.01, 0.001, 0.01)
    assert np.isnan(wide.bounds).all() and wide.verdict() == "rejected"
    assert ratio(0.001, 0.01, 0.001, 0.01).verdict() == "undecided"


@pytest.fixture(scope="module")
def lora_model():
    """A float64 tiny Qwen3 with non-trivial LoRA adapters, and a copy of its base (the reference)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    base = float64_norms(Qwen3ForCausalLM(config).double().eval())
    reference = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.double().eval(), reference


def lora_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 40, 3).tolist() for _ in range(n)]
    responses = [rng.integers(1, 40, rng.integers(1, 6)).tolist() for _ in range(n)]
    return prompts, responses


def test_jvp_tangents_on_lora_adapters_equal_finite_differences(lora_model):
    model, _ = lora_model
    prompts, responses = lora_batch(6)
    g = torch.Generator().manual_seed(0)
    v = {
        n: torch.randn(p.shape, generator=g, dtype=torch.float64)
        for n, p in model.named_parameters()
        if p.requires_grad
    }

    def score():
        return score_sequences(model, prompts, responses, pad_token_id=PAD, temperature=1.0)

    jvp = score_with_tangent(score, model, v)
    eps = 1e-6
    with torch.no_grad():
        with shifted(model, v, eps):
            plus = score()
        with shifted(model, v, -eps):
            minus = score()
    for i in range(len(responses)):
        for got, p, m in (
            (jvp.d_entropy[i], plus.entropy[i], minus.entropy[i]),
            (jvp.d_logprob[i], plus.logprob[i], minus.logprob[i]),
        ):
            np.testing.assert_allclose(got, ((p - m) / (2 * eps)).numpy(), rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in v)  # put back


def test_maxent_grpo_advantages_are_listwise(lora_model):
    from entroflow.checkpoint.replay import u_batch_advantages
    from entroflow.checkpoint.settings import RunShape
    from entroflow.training.maxent import maxent_advantages, maxent_weights

    model, reference = lora_model
    prompts, responses = lora_batch(8, seed=1)
    rewards = np.array([1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5])  # the second group: all equal
    run = RunShape(
        "maxent_grpo",
        4,
        8,
        1.0,
        0.0,
        maxent={"reward_temperature": 0.5, "floor": 1e-3},
        maxent_state={"tau": 0.7, "beta": 0.2},
    )
    advantages, kept = u_batch_advantages(
        model, prompts, responses, rewards, run, PAD, torch.float64
    )
    with torch.no_grad():
        ref = scores_of(reference, prompts, responses)
    w = maxent_weights(rewards.reshape(2, 4), ref.reshape(2, 4), 0.7, 0.2, 0.5, 1e-3)
    np.testing.assert_allclose(advantages, maxent_advantages(w), rtol=1e-10)
    assert kept.all() and np.abs(advantages[4:]).max() > 1e-3  # equal rewards still move
    np.testing.assert_allclose(advantages.reshape(2, 4).sum(1), 0, atol=1e-12)


def scores_of(model, prompts, responses):
    sc = score_sequences(model, prompts, responses, pad_token_id=PAD, temperature=1.0)
    return np.array([float(lp.sum()) for lp in sc.logprob])


def test_covariance_predictor_is_exact_for_tabular_natural_pg():
    """One softmax state, logits z, natural PG z' = z + η A: dH/dη at 0 = -Cov_π(log π, A)
    (Cui et al. 2025). As 'tokens' weighted by π with their log-prob change per unit step,
    the predictor reproduces the finite-difference derivative of the exact entropy."""
    rng = np.random.default_rng(0)
    z, adv = rng.normal(size=7) * 2, rng.normal(size=7)

    def entropy(logits):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return float(-(p * np.log(p)).sum()), p

    eps = 1e-6
    fd = (entropy(z + eps * adv)[0] - entropy(z - eps * adv)[0]) / (2 * eps)
    _, p = entropy(z)
    logp = np.log(p)
    d_logp = adv - (p * adv).sum()  # ∂ log π(a) / ∂η under z + η A
    got = st.covariance_predictor(logp, np.ones(7), d_logp, adv, p[None, :] * 1e6)[0]
    assert got == pytest.approx(fd, rel=1e-6)
    assert abs(fd) > 1e-2


def test_covariance_predictor_without_a_learning_signal_is_zero():
    """A step whose advantages are all equal (every group filtered, or one reward) predicts no
    change; it used to return 0/0 = NaN, which broke the training log."""
    counts = np.ones((1, 3))
    value = st.covariance_predictor(
        [-3.0, -5.0, -4.0], [3, 5, 4], [0.1, -0.2, 0.0], [0.0] * 3, counts
    )
    assert value.tolist() == [0.0]
