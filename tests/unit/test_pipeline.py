"""Generation-stage checks: shard splitting and prompts that do not fit the model's context."""

import numpy as np
import pandas as pd
import pytest

from entroflow.tokens.pipeline import PromptTooLongError, check_prompt_lengths, shard_rows


def test_shards_cover_every_prompt_once():
    parts = [shard_rows(10, i, 3) for i in range(3)]
    assert np.concatenate(parts).tolist() == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError, match="shard 3 out of range for 3 shards"):
        shard_rows(10, 3, 3)


def test_prompt_longer_than_context_is_named():
    with pytest.raises(
        PromptTooLongError, match="prompt 'p2' has 8 tokens, at or over the model's context of 8"
    ):
        check_prompt_lengths([[1] * 3, [1] * 8], ["p1", "p2"], context=8, max_new=2)
    check_prompt_lengths([[1] * 3], ["p1"], context=8, max_new=2)  # fits: no error


def test_prompt_plus_budget_over_context_warns(caplog):
    check_prompt_lengths([[1] * 6], ["p1"], context=8, max_new=4)
    assert "will be cut short" in caplog.text


def test_scoring_checks_and_their_merge(tiny_model, tiny_tokenizer):
    from entroflow.engines import SamplingParams
    from entroflow.engines.hf import HFEngine
    from entroflow.tokens.pipeline import generate_shard, merge_checks, score_table, scoring_checks

    prompts = ["1 + 2 =", "3 + 4 ="]
    problems = pd.DataFrame({"prompt": prompts, "answer": ["3", "7"], "id": ["a", "b"]})
    ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    engine = HFEngine(tiny_model, tiny_tokenizer, batch_size=4)
    table = generate_shard(
        problems,
        ids,
        engine,
        tiny_tokenizer,
        SamplingParams(max_new_tokens=8, samples_per_prompt=2),
        0,
        1,
    )
    scored = score_table(
        table, tiny_model, pad_token_id=tiny_tokenizer.pad_token_id, temperature=1.0
    )
    checks = scoring_checks(scored, tiny_model, 1.0, n_reference=3)
    assert checks["check_reference_responses"] == 3
    assert checks["check_scorer_vs_float64_entropy_max_abs_diff"] < 1e-4
    assert checks["check_scorer_vs_float64_logprob_max_abs_diff"] < 1e-4
    assert checks["check_engine_vs_scorer_logprob_max_abs_diff"] < 1e-4  # T = 1, no truncation
    a, b = dict(scored.attrs, **checks), dict(scored.attrs, **checks)
    b["check_scorer_vs_float64_entropy_max_abs_diff"] = 0.5
    merged = merge_checks([type(scored)(scored.groups, a), type(scored)(scored.groups, b)])
    assert merged["check_scorer_vs_float64_entropy_max_abs_diff"] == 0.5
    assert merged["check_reference_responses"] == 6


def test_gguf_entries_name_what_is_missing(tmp_path):
    from entroflow.lm.models import ModelError, gguf_file

    with pytest.raises(ModelError, match="package 'no_such_pkg' is not installed"):
        gguf_file("m", {"package": "no_such_pkg", "gguf_file": "x.gguf"})
    with pytest.raises(ModelError, match="GGUF file not found: .*missing.gguf"):
        gguf_file("m", {"path": str(tmp_path / "missing.gguf")})
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    assert gguf_file("m", {"path": str(tmp_path), "gguf_file": "w.gguf"}) == tmp_path / "w.gguf"
    assert gguf_file("m", {"path": str(tmp_path / "w.gguf")}) == tmp_path / "w.gguf"
    with pytest.raises(ModelError, match="needs 'gguf_file'"):
        gguf_file("m", {"path": str(tmp_path)})
