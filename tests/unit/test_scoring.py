"""The teacher-forced scorer against an independent float64, unpadded, full-logits path."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.lm.batching import (
    pair_batches,
    response_rows,
    split_by_lengths,
    token_budget_batches,
)
from entroflow.lm.scoring import score_responses
from tests.conftest import make_tiny_family_model, make_tiny_model


def reference_scores(model, prompt, response, temperature):
    """One sequence, no padding, whole logits in float64."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model.double()(input_ids=ids).logits[0].double() / temperature  # (T, V)
    model.float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    h = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    return h.numpy(), lp.numpy()


def random_pairs(vocab, n, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(1, 12)).tolist() for _ in range(n)]
    responses = [rng.integers(3, vocab, rng.integers(0, 20)).tolist() for _ in range(n)]
    return prompts, responses


@pytest.mark.parametrize("temperature", [0.6, 1.0])
@pytest.mark.parametrize("max_tokens,chunk_rows", [(10_000, 1024), (24, 3), (1, 1)])
def test_scorer_matches_unpadded_float64(
    tiny_model, tiny_tokenizer, temperature, max_tokens, chunk_rows
):
    prompts, responses = random_pairs(len(tiny_tokenizer), 9, seed=1)
    scored = score_responses(
        tiny_model,
        prompts,
        responses,
        pad_token_id=tiny_tokenizer.pad_token_id,
        temperature=temperature,
        max_tokens_per_batch=max_tokens,
        chunk_rows=chunk_rows,
    )
    for p, r, s in zip(prompts, responses, scored, strict=True):
        assert s.entropy.shape == (len(r),) and s.entropy.dtype == np.float32
        if not r:
            continue
        h, lp = reference_scores(tiny_model, p, r, temperature)
        # fp32 model vs fp64 model: differences come from the forward pass, not the entropy.
        np.testing.assert_allclose(s.entropy, h, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(s.logprob, lp, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,extra", [("Cohere", {"logit_scale": 0.25}), ("Granite", {"logits_scaling": 4.0})]
)
def test_scorer_applies_the_models_logit_scaling(tiny_tokenizer, family, extra):
    model = make_tiny_family_model(family, tiny_tokenizer, seed=3, **extra)
    prompts, responses = random_pairs(len(tiny_tokenizer), 4, seed=4)
    scored = score_responses(
        model, prompts, responses, pad_token_id=tiny_tokenizer.pad_token_id, temperature=0.7
    )
    for p, r, s in zip(prompts, responses, scored, strict=True):
        if r:
            h, lp = reference_scores(model, p, r, 0.7)  # the model's own (scaled) logits
            np.testing.assert_allclose(s.entropy, h, atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(s.logprob, lp, atol=2e-5, rtol=1e-5)


class _TripledLogits(LlamaForCausalLM):
    """A family whose forward transforms its logits in a way the scorer does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_a_head_the_scorer_cannot_reproduce_is_refused(tiny_tokenizer):
    model = make_tiny_family_model("Llama", tiny_tokenizer)
    model.__class__ = _TripledLogits
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        score_responses(model, [[5, 6]], [[7, 8]], pad_token_id=tiny_tokenizer.pad_token_id)


def test_left_padding_does_not_change_values(tiny_model, tiny_tokenizer):
    prompts, responses = random_pairs(len(tiny_tokenizer), 6, seed=2)
    kwargs = dict(pad_token_id=tiny_tokenizer.pad_token_id, temperature=1.0)
    batched = score_responses(tiny_model, prompts, responses, max_tokens_per_batch=10_000, **kwargs)
    single = score_responses(tiny_model, prompts, responses, max_tokens_per_batch=1, **kwargs)
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5)
        np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-5)


def test_engine_logprobs_match_scorer_at_t1(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3)
    engine = HFEngine(model, tiny_tokenizer, batch_size=5)
    prompts, _ = random_pairs(len(tiny_tokenizer), 4, seed=4)
    params = SamplingParams(max_new_tokens=12, samples_per_prompt=3, seed=5)
    gens = engine.generate(prompts, params)
    assert [(g.prompt_row, g.sample_index) for g in gens] == [
        (r, s) for r in range(4) for s in range(3)
    ]
    scored = score_responses(
        model,
        [prompts[g.prompt_row] for g in gens],
        [g.token_ids for g in gens],
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    for g, s in zip(gens, scored, strict=True):
        assert g.finish_reason == (
            "stop" if g.token_ids[-1] == tiny_tokenizer.eos_token_id else "length"
        )
        assert len(g.token_ids) <= 12
        np.testing.assert_allclose(g.engine_logprob, s.logprob, atol=1e-4)


def test_engine_seed_reproducible_and_truncation_respected(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=6)
    engine = HFEngine(model, tiny_tokenizer, batch_size=8)
    prompts, _ = random_pairs(len(tiny_tokenizer), 3, seed=7)
    params = SamplingParams(
        temperature=0.7, top_k=2, max_new_tokens=10, samples_per_prompt=2, seed=1
    )
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
    for g in a:  # a sampled token always has positive mass under the truncated distribution
        assert np.all(np.isfinite(g.engine_logprob)) and np.all(g.engine_logprob <= 0)
    scored = score_responses(
        model,
        [prompts[g.prompt_row] for g in a],
        [g.token_ids for g in a],
        pad_token_id=tiny_tokenizer.pad_token_id,
        temperature=0.7,
    )
    for g, s in zip(a, scored, strict=True):
        # Truncation only removes mass: the engine's log-prob is at least the full-vocabulary one.
        assert np.all(g.engine_logprob >= s.logprob - 1e-5)


def test_token_budget_batches_cover_everything_once():
    lengths = [5, 1, 9, 3, 3, 12, 7]
    batches = token_budget_batches(lengths, 15)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 15


def test_pair_batches_plan_by_whole_length_and_split_cuts_in_order():
    prompts, responses = [[1] * 4, [1], [1] * 2], [[2] * 3, [2] * 6, []]
    assert pair_batches(prompts, responses, 15) == token_budget_batches([7, 7, 2], 15)
    pieces = split_by_lengths(np.arange(6), [2, 0, 3, 1])
    assert [p.tolist() for p in pieces] == [[0, 1], [], [2, 3, 4], [5]]


def test_response_rows_point_before_each_response_token():
    rows, cols = response_rows([3, 1], width=6)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [2, 3, 4, 4]


def test_forking_temperature_warper_scales_rows_by_their_entropy_class():
    import torch

    from entroflow.engines import ForkingTemperature
    from entroflow.engines.hf import ForkingTemperatureWarper

    # Row 0 is nearly one-hot (entropy ~0), row 1 uniform over 8 (entropy log 8 = 2.08 nats).
    scores = torch.tensor([[12.0] + [0.0] * 7, [1.0] * 8])
    warper = ForkingTemperatureWarper(ForkingTemperature(threshold=1.0, t_high=2.0, t_low=0.5))
    out = warper(torch.zeros(2, 1, dtype=torch.long), scores.clone())
    torch.testing.assert_close(out[0], scores[0] / 0.5)
    torch.testing.assert_close(out[1], scores[1] / 2.0)
    # The classifying entropy is taken at base_temperature: at T = 20 row 0 is near-uniform too.
    hot = ForkingTemperatureWarper(ForkingTemperature(1.0, 2.0, 0.5, base_temperature=20.0))
    torch.testing.assert_close(hot(None, scores.clone())[0], scores[0] / 2.0)
    with pytest.raises(ValueError, match="t_low must be > 0"):
        ForkingTemperature(1.0, 2.0, 0.0)


def test_engine_with_forking_temperature_records_the_warped_logprobs(tiny_tokenizer):
    """Engine log-probs are those of the per-token temperature actually used, checked by
    recomputing each step's class and tempered log-softmax from a teacher-forced pass."""
    import torch

    from entroflow.engines import ForkingTemperature
    from entroflow.lm.entropy import entropy_and_logprob

    model = make_tiny_model(tiny_tokenizer, seed=5)
    engine = HFEngine(model, tiny_tokenizer, batch_size=4)
    forking = ForkingTemperature(threshold=3.5, t_high=1.7, t_low=0.6)  # this model: H ~ 3-4.5
    prompt = tiny_tokenizer("7 + 5 =")["input_ids"]
    gens = engine.generate(
        [prompt], SamplingParams(max_new_tokens=10, samples_per_prompt=3, seed=1, forking=forking)
    )
    classes = set()
    for g in gens:
        ids = torch.tensor([list(prompt) + g.token_ids.tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (L, V)
        h, _ = entropy_and_logprob(logits)
        t = torch.where(h > forking.threshold, forking.t_high, forking.t_low)
        classes |= {round(x, 4) for x in t.tolist()}
        expected = torch.log_softmax(logits / t[:, None], -1).gather(
            1, torch.as_tensor(g.token_ids, dtype=torch.long)[:, None]
        )[:, 0]
        np.testing.assert_allclose(g.engine_logprob, expected.numpy(), atol=1e-4)
    assert classes == {forking.t_high, forking.t_low}  # both kinds of token were sampled
