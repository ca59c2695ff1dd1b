"""The sglang engine. sglang cannot be installed on this project's machines (it pins its own CUDA
torch): what runs here is the conversion of its documented output format and the clear error
without it; the engine itself is tested only where sglang and a GPU exist."""

import importlib.util

import numpy as np
import pytest
import torch

from entroflow.engines import ForkingTemperature, SamplingParams, get_engine
from entroflow.engines.sglang import sampling_dict, to_generation
from entroflow.lm.models import ModelError

HAS_SGLANG = importlib.util.find_spec("sglang") is not None

EOS = [7, 9]


def test_output_conversion_keeps_eos_and_logprobs():
    stopped = {
        "output_ids": [5, 6, 7],
        "meta_info": {
            "finish_reason": {"type": "stop", "matched": 7},
            "output_token_logprobs": [(-0.5, 5, None), (-1.25, 6, None), (-0.01, 7, None)],
        },
    }
    g = to_generation(stopped, prompt_row=3, sample=1, eos_token_ids=EOS)
    assert (g.prompt_row, g.sample_index, g.finish_reason) == (3, 1, "stop")
    assert g.token_ids.tolist() == [5, 6, 7] and g.token_ids.dtype == np.int32
    np.testing.assert_allclose(g.engine_logprob, [-0.5, -1.25, -0.01])


def test_output_conversion_appends_a_matched_stop_token_left_out():
    out = {"output_ids": [5, 6], "meta_info": {"finish_reason": {"type": "stop", "matched": 9},
                                               "output_token_logprobs": [(-0.5, 5, None), (-1.0, 6, None)]}}  # fmt: skip
    g = to_generation(out, 0, 0, EOS)
    assert g.token_ids.tolist() == [5, 6, 9]
    assert np.isnan(g.engine_logprob[-1])  # sglang gave none for it: NaN, not a made-up value


def test_length_finish_and_missing_logprobs():
    g = to_generation(
        {"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length"}}}, 0, 0, EOS
    )
    assert g.finish_reason == "length" and np.isnan(g.engine_logprob).all()


def test_sampling_parameters_mean_the_same():
    d = sampling_dict(SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=100), EOS)
    assert d == {"temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_new_tokens": 100,
                 "stop_token_ids": EOS, "skip_special_tokens": False}  # fmt: skip
    with pytest.raises(ValueError, match="engine: hf"):
        sampling_dict(SamplingParams(forking=ForkingTemperature(1.0, 1.5, 0.7)), EOS)


@pytest.mark.skipif(HAS_SGLANG, reason="sglang is installed here")
def test_missing_sglang_is_a_clear_error():
    with pytest.raises(ModelError, match=r"entroflow\[sglang\]"):
        get_engine("sglang", model_path="unused", tokenizer=None)


@pytest.mark.skipif(
    not (HAS_SGLANG and torch.cuda.is_available()),
    reason="sglang is not installable on this project's machines (it pins its own CUDA torch)",
)
def test_sglang_engine_generates(tmp_path, tiny_tokenizer):
    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny", tiny_tokenizer, seed=0)
    engine = get_engine("sglang", model_path=str(folder), tokenizer=tiny_tokenizer, batch_size=4)
    try:
        gens = engine.generate(
            [[40, 41, 42], [43]], SamplingParams(max_new_tokens=8, samples_per_prompt=2)
        )
    finally:
        engine.shutdown()
    assert [(g.prompt_row, g.sample_index) for g in gens] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(1 <= len(g.token_ids) <= 8 for g in gens)
