"""Generation-stage checks: shard splitting and prompts that do not fit the model's context."""

import numpy as np
import pytest

from entroflow.pipeline import PromptTooLongError, check_prompt_lengths, shard_rows


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
