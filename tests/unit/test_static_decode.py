"""The static-cache decode loop (the `hf` engine's GPU path) against the scorer and `generate`.

On CPU it runs without CUDA graphs; rows are retired into smaller batches as they finish (the
tests make EOS frequent so that happens), which must not change any row's values.
"""

import numpy as np
import pytest
import torch

from entroflow.engines import ForkingTemperature, SamplingParams, static_cache, static_decode
from entroflow.engines.hf import HFEngine
from entroflow.lm.fused_entropy import fused_supported
from entroflow.lm.scoring import score_responses
from tests.conftest import make_tiny_family_model, make_tiny_model

EOS = list(range(3, 40))  # many "EOS" tokens: rows stop at scattered depths
STATIC = {"check_every": 2, "min_bucket": 1, "visible_step": 8}  # retire and window early


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, seed=11)


def prompts_for(vocab, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(40, vocab, rng.integers(1, 14)).tolist() for _ in range(n)]


@pytest.fixture
def shrinks(monkeypatch):
    calls = []
    original = static_decode.StaticDecoder._shrink

    def spy(self, batch, live):
        calls.append((batch.size, len(live)))
        return original(self, batch, live)

    monkeypatch.setattr(static_decode.StaticDecoder, "_shrink", spy)
    return calls


def assert_cut_at_eos_and_equal_to_the_scorer(model, tokenizer, prompts, gens, temperature):
    """Each row ends at its first EOS or at 24 tokens, and its engine log-probs and entropies are
    the scorer's (same fp32 model, different batching and attention masks: rounding only)."""
    for g in gens:
        stop = np.isin(g.token_ids, EOS)
        assert (g.finish_reason == "stop") == bool(stop.any()) and not stop[:-1].any()
        assert g.finish_reason == "stop" or len(g.token_ids) == 24
    scored = score_responses(
        model,
        [prompts[g.prompt_row] for g in gens],
        [g.token_ids for g in gens],
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
    )
    for g, s in zip(gens, scored, strict=True):
        np.testing.assert_allclose(g.engine_logprob, s.logprob, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(g.entropy, s.entropy, atol=2e-5, rtol=1e-5)


FUSED_ON_CPU = fused_supported(torch.device("cpu"))  # Triton's interpreter (tests/conftest.py)


@pytest.mark.parametrize(
    "temperature,attention,options",
    [
        (1.0, "sdpa", {}),
        (0.7, "sdpa", {}),
        (0.7, "eager", {}),
        pytest.param(
            0.7, "sdpa", {"fused_sampler": True},
            marks=pytest.mark.skipif(not FUSED_ON_CPU, reason="needs TRITON_INTERPRET=1"),
        ),
        (1.0, "sdpa", {"compile": "aot_eager"}),
    ],
)  # fmt: skip
def test_logprobs_and_inline_entropy_match_the_scorer(
    model, tiny_tokenizer, shrinks, temperature, attention, options, monkeypatch
):
    monkeypatch.setattr(model.config, "_attn_implementation", attention)
    engine = HFEngine(
        model,
        tiny_tokenizer,
        batch_size=7,
        eos_token_ids=EOS,
        decoder="static",
        static_options={**STATIC, **options},
    )
    prompts = prompts_for(len(tiny_tokenizer), 5, seed=1)
    params = SamplingParams(
        temperature=temperature,
        max_new_tokens=24,
        samples_per_prompt=3,
        seed=2,
        record_entropy=True,
    )
    gens = engine.generate(prompts, params)
    assert [(g.prompt_row, g.sample_index) for g in gens] == [
        (r, s) for r in range(5) for s in range(3)
    ]
    assert shrinks, "no batch was retired into a smaller one: the test does not cover it"
    lengths = {len(g.token_ids) for g in gens}
    assert len(lengths) > 3  # scattered stopping depths
    assert_cut_at_eos_and_equal_to_the_scorer(model, tiny_tokenizer, prompts, gens, temperature)


def test_greedy_tokens_equal_generate(model, tiny_tokenizer, shrinks):
    prompts = prompts_for(len(tiny_tokenizer), 9, seed=3)
    params = SamplingParams(top_k=1, max_new_tokens=20, record_entropy=True)
    runs = {}
    for decoder in ("generate", "static"):
        engine = HFEngine(
            model, tiny_tokenizer, batch_size=4, eos_token_ids=EOS, decoder=decoder,
            static_options=STATIC if decoder == "static" else None,
        )  # fmt: skip
        runs[decoder] = engine.generate(prompts, params)
    assert shrinks
    for a, b in zip(runs["generate"], runs["static"], strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.entropy, b.entropy, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,extra",
    [
        ("Llama", {}),  # these families build their masks differently from Qwen3
        ("Mistral", {"sliding_window": None}),  # a window: `generate` (test_decoder_choice)
        ("Phi3", {}),  # fused qkv and gate/up projections
        ("Gemma", {"head_dim": 8}),  # scaled embeddings
        ("Cohere", {"logit_scale": 0.25}),  # scaled logits
        ("Granite", {"logits_scaling": 4.0}),
    ],
)
def test_other_families_decode_like_generate(tiny_tokenizer, family, extra):
    model = make_tiny_family_model(family, tiny_tokenizer, seed=4, **extra)
    prompts = prompts_for(len(tiny_tokenizer), 6, seed=9)
    params = SamplingParams(top_k=1, max_new_tokens=12, record_entropy=True)
    runs = {
        decoder: HFEngine(
            model, tiny_tokenizer, batch_size=6, eos_token_ids=EOS, decoder=decoder
        ).generate(prompts, params)
        for decoder in ("generate", "static")
    }
    for a, b in zip(runs["generate"], runs["static"], strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.entropy, b.entropy, atol=2e-5, rtol=1e-5)


def test_forking_temperature_and_top_p_run_on_the_static_path(model, tiny_tokenizer):
    prompts = prompts_for(len(tiny_tokenizer), 4, seed=5)
    forking = ForkingTemperature(threshold=2.0, t_high=1.5, t_low=0.5)
    engine = HFEngine(model, tiny_tokenizer, batch_size=8, decoder="static", static_options=STATIC)
    gens = engine.generate(prompts, SamplingParams(top_p=0.9, max_new_tokens=10, forking=forking))
    assert len(gens) == 4 and all(np.isfinite(g.engine_logprob).all() for g in gens)
    assert all(g.entropy is None for g in gens)


def test_same_seed_same_samples(model, tiny_tokenizer):
    prompts = prompts_for(len(tiny_tokenizer), 3, seed=6)
    engine = HFEngine(model, tiny_tokenizer, batch_size=2, decoder="static", eos_token_ids=EOS)
    params = SamplingParams(max_new_tokens=12, samples_per_prompt=2, seed=9)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [g.token_ids.tolist() for g in a] == [g.token_ids.tolist() for g in b]


def test_compiled_step_equals_the_plain_step(model, tiny_tokenizer, shrinks):
    """torch.compile (aot_eager here: Dynamo's capture without codegen) through batch sizes and
    attention windows that change, without a recompile for each."""
    torch._dynamo.reset()  # count this test's compilations only
    counters = torch._dynamo.utils.counters
    prompts = prompts_for(len(tiny_tokenizer), 9, seed=8)
    params = SamplingParams(max_new_tokens=30, seed=5, record_entropy=True)
    runs = {}
    for compile in (False, "aot_eager"):
        frames = counters["stats"]["unique_graphs"]
        engine = HFEngine(
            model, tiny_tokenizer, batch_size=9, eos_token_ids=EOS, decoder="static",
            static_options={**STATIC, "compile": compile},
        )  # fmt: skip
        runs[compile] = engine.generate(prompts, params)
        compiled = counters["stats"]["unique_graphs"] - frames
    assert len(shrinks) >= 2  # batches 16 -> 8 -> ... and windows of 8 columns: several shapes
    assert 1 <= compiled <= 3, compiled  # static first try, then dynamic (at most a 0/1 case)
    for a, b in zip(runs[False], runs["aot_eager"], strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.engine_logprob, b.engine_logprob, atol=1e-5)
        np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5)


def test_decoder_choice(model, tiny_tokenizer):
    assert HFEngine(model, tiny_tokenizer).decoder == "generate"  # auto: static on CUDA only
    windowed = make_tiny_family_model("Mistral", tiny_tokenizer, sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window attention"):
        HFEngine(windowed, tiny_tokenizer, decoder="static")
    with pytest.raises(ValueError, match="unknown decoder"):
        HFEngine(model, tiny_tokenizer, decoder="fast")
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="flash_attention_2"):
            HFEngine(model, tiny_tokenizer, decoder="static")
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_cuda_graphs_match_eager(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=12).cuda()
    prompts = prompts_for(len(tiny_tokenizer), 6, seed=7)
    params = SamplingParams(max_new_tokens=16, samples_per_prompt=2, seed=4, record_entropy=True)
    runs = [
        HFEngine(model, tiny_tokenizer, batch_size=8, eos_token_ids=EOS, decoder="static",
                 static_options={**STATIC, "cuda_graphs": graphs, "compile": compile}
                 ).generate(prompts, params)
        for graphs, compile in ((False, False), (True, False), (True, True))
    ]  # fmt: skip
    for eager, graphs, compiled in zip(*runs, strict=True):
        assert eager.token_ids.tolist() == graphs.token_ids.tolist()
        np.testing.assert_allclose(eager.entropy, graphs.entropy, atol=1e-5)
        assert eager.token_ids.tolist() == compiled.token_ids.tolist()  # inductor: rounding only
        np.testing.assert_allclose(eager.entropy, compiled.entropy, atol=1e-4)
        np.testing.assert_allclose(eager.engine_logprob, compiled.engine_logprob, atol=1e-4)


def test_cache_size_is_checked_before_prefill(model):
    length = 40
    cache = static_cache.StaticKVCache(model.config, 8, length, torch.float32, "cpu")
    actual = sum(t.nbytes for t in cache.keys + cache.values)
    assert static_cache.cache_bytes(model.config, 8, length, torch.float32) == actual
    static_cache.check_cache_fits(model.config, 8, length, torch.float32, free=actual)
    with pytest.raises(torch.OutOfMemoryError, match="batch_size to 2 or less"):  # 3.2 rows fit
        static_cache.check_cache_fits(model.config, 8, length, torch.float32, int(actual / 2.5))


def test_a_batch_whose_cache_cannot_fit_fails_before_prefill(model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(static_decode, "free_device_bytes", lambda device: 1_000)
    engine = HFEngine(model, tiny_tokenizer, batch_size=4, eos_token_ids=EOS, decoder="static")
    prompts = prompts_for(len(tiny_tokenizer), 4, seed=3)
    with pytest.raises(torch.OutOfMemoryError, match="not even 8 rows"):
        engine.generate(prompts, SamplingParams(max_new_tokens=8, seed=0))


@pytest.fixture
def refills(monkeypatch):
    calls = []
    original = static_decode.StaticDecoder._refill

    def spy(self, batch, host, finished, waiting, *args):
        calls.append((batch.size, int(finished.sum()), len(waiting)))
        return original(self, batch, host, finished, waiting, *args)

    monkeypatch.setattr(static_decode.StaticDecoder, "_refill", spy)
    return calls


REFILL = {**STATIC, "refill": True}


def test_refill_greedy_tokens_equal_one_prompt_at_a_time(model, tiny_tokenizer, refills, shrinks):
    """Continuous batching: 3 rows (a batch of 4) take 11 prompts of 1-13 tokens as rows free
    up; each row's greedy tokens and entropies are those of decoding its prompt alone."""
    prompts = prompts_for(len(tiny_tokenizer), 11, seed=3)
    params = SamplingParams(top_k=1, max_new_tokens=20, record_entropy=True)
    alone = HFEngine(model, tiny_tokenizer, batch_size=1, eos_token_ids=EOS, decoder="generate")
    refilling = HFEngine(
        model, tiny_tokenizer, batch_size=3, eos_token_ids=EOS, decoder="static",
        static_options=REFILL,
    )  # fmt: skip
    done = []
    expected, got = (
        alone.generate(prompts, params),
        refilling.generate(prompts, params, progress=lambda d, n, s: done.append((d, n))),
    )
    assert len(refills) >= 3 and shrinks  # rows refilled, then retired once none wait
    assert done[-1] == (11, 11) and done == sorted(done)
    assert len({len(g.token_ids) for g in got}) > 3  # rows end out of step
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.entropy, b.entropy, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(a.engine_logprob, b.engine_logprob, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"compile": "aot_eager"}])
def test_refill_sampled_logprobs_match_the_scorer(model, tiny_tokenizer, refills, options):
    prompts = prompts_for(len(tiny_tokenizer), 6, seed=4)
    engine = HFEngine(
        model, tiny_tokenizer, batch_size=4, eos_token_ids=EOS, decoder="static",
        static_options={**REFILL, **options},
    )  # fmt: skip
    params = SamplingParams(
        temperature=0.7, max_new_tokens=24, samples_per_prompt=3, seed=2, record_entropy=True
    )
    gens = engine.generate(prompts, params)
    assert refills and [(g.prompt_row, g.sample_index) for g in gens] == [
        (r, s) for r in range(6) for s in range(3)
    ]
    assert_cut_at_eos_and_equal_to_the_scorer(model, tiny_tokenizer, prompts, gens, 0.7)
    again = engine.generate(prompts, params)
    assert [g.token_ids.tolist() for g in again] == [g.token_ids.tolist() for g in gens]
