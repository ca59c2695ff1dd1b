"""Durable batches: a generation or scoring job stopped part-way and run again gives exactly the
uninterrupted result, recomputing only the batches that were not saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine
from entroflow.journal import BatchJournal, fingerprint, journal_folder, load_or_compute
from entroflow.lm.scoring import decoder_body
from entroflow.tokens.pipeline import generate_shard, score_table
from tests.conftest import make_tiny_model


class Crash(RuntimeError):
    pass


class CountingEngine:
    """The real HF engine, counting calls and raising (like a kill) after `crash_after` calls."""

    def __init__(self, engine: HFEngine, crash_after: int | None = None):
        self.engine, self.crash_after, self.calls = engine, crash_after, 0

    def generate(self, prompt_ids, params, progress=None):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise Crash("killed")
        self.calls += 1
        return self.engine.generate(prompt_ids, params)


def test_journal_roundtrip_and_other_settings_discard(tmp_path):
    folder = journal_folder(tmp_path / "out.h5")
    assert folder.name == "out.h5.partial"
    journal = BatchJournal(folder, fingerprint({"t": 1.0}))
    assert journal.resumed == 0 and journal.load(0) is None
    journal.save(3, {"x": np.arange(4, dtype=np.float32), "s": np.asarray(["stop"])})
    again = BatchJournal(folder, fingerprint({"t": 1.0}))
    assert again.resumed == 1
    saved = again.load(3)
    np.testing.assert_array_equal(saved["x"], np.arange(4, dtype=np.float32))
    assert saved["s"].tolist() == ["stop"]
    assert not list(folder.glob(".*.tmp"))  # no temporary left behind
    other = BatchJournal(folder, fingerprint({"t": 0.7}))
    assert other.resumed == 0 and other.load(3) is None
    other.remove()
    assert not folder.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-a-zip"])
def test_an_unreadable_batch_is_named_and_recomputed(tmp_path, caplog, damage):
    folder = journal_folder(tmp_path / "out.h5")
    journal = BatchJournal(folder, "k")
    journal.save(0, {"x": np.arange(1000, dtype=np.float32)})
    path = folder / "batch-000000.npz"
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "not-a-zip": b"x" * 99}[damage]
    )
    again = BatchJournal(folder, "k")
    calls = []
    redo = load_or_compute(again, 0, lambda: calls.append(1) or {"x": np.ones(2)})
    assert calls == [1] and redo["x"].tolist() == [1.0, 1.0]
    assert "batch-000000.npz is unreadable" in caplog.text
    assert BatchJournal(folder, "k").load(0)["x"].tolist() == [1.0, 1.0]  # saved anew


def test_a_damaged_journal_key_starts_over(tmp_path):
    folder = journal_folder(tmp_path / "out.h5")
    BatchJournal(folder, "k").save(0, {"x": np.zeros(1)})
    (folder / BatchJournal.META).write_text("{not json")
    assert BatchJournal(folder, "k").resumed == 0


def test_fingerprint_sees_array_contents_and_dtype():
    a = np.arange(5, dtype=np.int32)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.astype(np.int64))
    b = a.copy()
    b[2] = 9
    assert fingerprint(a) != fingerprint(b)


def _problems(tokenizer, n=7):
    prompts = [f"{i} + {i + 1} =" for i in range(n)]
    frame = pd.DataFrame(
        {"prompt": prompts, "answer": [str(2 * i + 1) for i in range(n)], "id": map(str, range(n))}
    )
    return frame, [tokenizer(p)["input_ids"] for p in prompts]


def _generate(tokenizer, problems, prompt_ids, engine, journal=None):
    params = SamplingParams(max_new_tokens=12, samples_per_prompt=2, seed=5)
    return generate_shard(
        problems,
        prompt_ids,
        engine,
        tokenizer,
        params,
        shard=0,
        n_shards=1,
        prompts_per_batch=2,
        journal=journal,
    )


def _assert_same_tables(a, b):
    assert a.groups.keys() == b.groups.keys()
    for group in a.groups:
        assert a.groups[group].keys() == b.groups[group].keys()
        for name, values in a.groups[group].items():
            np.testing.assert_array_equal(values, b.groups[group][name], err_msg=f"{group}/{name}")


def test_generation_resumes_after_a_crash_with_the_same_result(tmp_path, tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=3)
    problems, prompt_ids = _problems(tiny_tokenizer)
    hf = HFEngine(model, tiny_tokenizer, batch_size=4)
    reference = _generate(tiny_tokenizer, problems, prompt_ids, CountingEngine(hf))

    folder, key = tmp_path / "gen.partial", fingerprint("gen")
    crashing = CountingEngine(hf, crash_after=2)
    with pytest.raises(Crash):
        _generate(tiny_tokenizer, problems, prompt_ids, crashing, BatchJournal(folder, key))
    journal = BatchJournal(folder, key)
    assert journal.resumed == 2
    rest = CountingEngine(hf)
    resumed = _generate(tiny_tokenizer, problems, prompt_ids, rest, journal)
    assert rest.calls == 2  # 4 batches of 2 prompts (the last has 1); 2 were saved
    _assert_same_tables(reference, resumed)
    # No response lost or duplicated: every (prompt, sample) exactly once.
    pairs = list(
        zip(resumed["responses/prompt_index"], resumed["responses/sample_index"], strict=True)
    )
    assert sorted(pairs) == [(p, s) for p in range(7) for s in range(2)]


def test_scoring_resumes_after_a_crash_with_the_same_result(tmp_path, tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=4)
    problems, prompt_ids = _problems(tiny_tokenizer)
    table = _generate(
        tiny_tokenizer, problems, prompt_ids, HFEngine(model, tiny_tokenizer, batch_size=4)
    )
    kwargs = {"pad_token_id": tiny_tokenizer.pad_token_id, "temperature": 1.0}
    kwargs["max_tokens_per_batch"] = 40  # several batches
    reference = score_table(table, model, **kwargs)

    calls = {"n": 0}

    def count_then_crash(module, args, kw):
        calls["n"] += 1
        if calls.get("limit") is not None and calls["n"] > calls["limit"]:
            raise Crash("killed")

    handle = decoder_body(model).register_forward_pre_hook(count_then_crash, with_kwargs=True)
    try:
        folder, key = tmp_path / "score.partial", fingerprint("score")
        calls["limit"] = 3
        with pytest.raises(Crash):
            score_table(table, model, journal=BatchJournal(folder, key), **kwargs)
        journal = BatchJournal(folder, key)
        assert journal.resumed == 3
        calls.update(n=0, limit=None)
        resumed = score_table(table, model, journal=journal, **kwargs)
        total_batches = 3 + calls["n"]
    finally:
        handle.remove()
    assert calls["n"] >= 1 and total_batches > 3
    np.testing.assert_array_equal(resumed["tokens/entropy"], reference["tokens/entropy"])
    np.testing.assert_array_equal(resumed["tokens/logprob"], reference["tokens/logprob"])
