"""HDF5 contract: round trip, checks, concatenation, atomic writes, pandas readers."""

import h5py
import numpy as np
import pytest

from entroflow.io import (
    ContractError,
    TokenTable,
    check_contract,
    concat_token_tables,
    flatten,
    load_checked,
    read_token_file,
    read_tokens,
    responses_frame,
    str_array,
    write_token_file,
)


def make_table(n_prompts=2, samples=2, seed=0, vocab=True):
    rng = np.random.default_rng(seed)
    prompt_ids = [rng.integers(0, 50, rng.integers(2, 6)) for _ in range(n_prompts)]
    responses = [rng.integers(0, 50, rng.integers(0, 7)) for _ in range(n_prompts * samples)]
    p_flat, p_off = flatten(prompt_ids, np.int32)
    t_flat, t_off = flatten(responses, np.int32)
    n, t = len(responses), len(t_flat)
    groups = {
        "prompts": {
            "text": str_array(f"prompt {i} ü" for i in range(n_prompts)),
            "answer": str_array(str(i) for i in range(n_prompts)),
            "offsets": p_off,
            "token_ids": p_flat,
            "dataset_index": np.arange(n_prompts, dtype=np.int32),
        },
        "responses": {
            "offsets": t_off,
            "prompt_index": np.repeat(np.arange(n_prompts), samples).astype(np.int32),
            "sample_index": np.tile(np.arange(samples), n_prompts).astype(np.int32),
            "finish_reason": str_array(["stop", "length"] * (n // 2) + ["stop"] * (n % 2)),
            "correct": rng.integers(-1, 2, n).astype(np.int8),
            "text": str_array(f"response {i}" for i in range(n)),
        },
        "tokens": {
            "token_id": t_flat,
            "entropy": rng.random(t).astype(np.float32),
            "logprob": -rng.random(t).astype(np.float32),
            "engine_logprob": np.full(t, np.nan, dtype=np.float32),
        },
    }
    if vocab:
        ids = np.unique(t_flat).astype(np.int32)
        groups["vocab"] = {"ids": ids, "text": str_array(f"t{i}" for i in ids)}
    return TokenTable(groups=groups, attrs={"model": "m", "temperature": 0.6, "top_k": 0})


def test_round_trip_preserves_everything(tmp_path):
    table = make_table()
    path = tmp_path / "entropy.h5"
    write_token_file(path, table)
    back = load_checked(path)
    for g, datasets in table.groups.items():
        for name, values in datasets.items():
            got = back.groups[g][name]
            if values.dtype == object:
                assert got.tolist() == values.tolist()
            else:
                assert got.dtype == values.dtype
                np.testing.assert_array_equal(got, values)
    assert back.attrs["model"] == "m" and back.attrs["temperature"] == 0.6
    assert "created" in back.attrs and back.attrs["contract_version"] == 1
    assert path.stat().st_mode & 0o044 == 0o044  # readable by group and others, like open() makes
    with h5py.File(path) as f:
        assert f["tokens/entropy"].compression == "gzip"
        assert f["tokens/entropy"].chunks is not None


def test_no_temporary_left_and_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "out.h5"
    bad = make_table()
    bad.groups["tokens"]["bad"] = np.array([object()], dtype=object)  # h5py cannot store it
    with pytest.raises(TypeError):
        write_token_file(path, bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: t.groups["tokens"].pop("entropy"), "tokens/entropy"),
        (lambda t: t.groups.pop("prompts"), "prompts/"),
        (
            lambda t: t.groups["responses"].__setitem__("offsets", t["responses/offsets"] + 1),
            "start at 0",
        ),
        (lambda t: t.groups["tokens"].__setitem__("entropy", t["tokens/entropy"][:-1]), "rows"),
        (
            lambda t: t.groups["tokens"].__setitem__(
                "token_id", t["tokens/token_id"].astype(np.int64)
            ),
            "dtype",
        ),
        (
            lambda t: t.groups["responses"].__setitem__(
                "prompt_index", t["responses/prompt_index"] + 5
            ),
            "outside",
        ),
    ],
)
def test_contract_violations_are_named(mutate, message):
    table = make_table()
    mutate(table)
    with pytest.raises(ContractError, match=message):
        check_contract(table, name="x.h5")


def test_truncated_file_gives_readable_error(tmp_path):
    path = tmp_path / "entropy.h5"
    write_token_file(path, make_table())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="entropy.h5"):
        read_token_file(path)


def test_concat_reindexes_prompts_and_offsets():
    a, b = make_table(2, 2, seed=1), make_table(3, 2, seed=2)
    c = concat_token_tables([a, b])
    check_contract(c)
    assert c.n_prompts == 5 and c.n_responses == 10
    for i in range(b.n_responses):
        np.testing.assert_array_equal(c.response_tokens(a.n_responses + i), b.response_tokens(i))
        p = c["responses/prompt_index"][a.n_responses + i]
        np.testing.assert_array_equal(
            c.prompt_tokens(p), b.prompt_tokens(b["responses/prompt_index"][i])
        )
    assert set(c["vocab/ids"]) == set(a["vocab/ids"]) | set(b["vocab/ids"])


def test_frames(tmp_path):
    table = make_table(3, 2)
    path = tmp_path / "e.h5"
    write_token_file(path, table)
    tokens = read_tokens(path)
    assert len(tokens) == table.n_tokens
    assert {"response", "position", "token_id", "entropy", "token"} <= set(tokens.columns)
    first = tokens[tokens.response == 1]
    assert first.position.tolist() == list(range(len(first)))
    resp = responses_frame(table)
    for i, row in resp.iterrows():
        h = table.response_tokens(i, "entropy")
        assert row.length == len(h)
        if len(h):
            assert row.mean_entropy == pytest.approx(h.mean(), rel=1e-6)
