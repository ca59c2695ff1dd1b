"""The viewer's data layer and token view, without a browser: lazy reads, per-response summaries
and top-K against brute force, filters that hide nothing by default, colour scales."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from entroflow.io import TokenTable, flatten, per_response, str_array, write_token_file
from entroflow.training.traces import TraceWriter
from entroflow.viewer.data import EntropySource, ViewerError
from entroflow.viewer.render import colour_values, heatmap_html, legend, token_view


def step_table(rng, n_responses=5, vocab=30) -> TokenTable:
    lengths = rng.integers(0, 40, n_responses)
    lengths[0] = 12  # at least one non-empty; an empty response is allowed too
    lengths[1] = 0
    tokens = [rng.integers(0, vocab, n) for n in lengths]
    entropy = [rng.exponential(0.3, n).astype(np.float32) for n in lengths]
    flat_ids, offsets = flatten(tokens, np.int32)
    flat_h, _ = flatten(entropy, np.float32)
    prompts, prompt_off = flatten([[1, 2], [3]], np.int32)
    return TokenTable(
        groups={
            "prompts": {
                "text": str_array(["p zero", "p one"]),
                "answer": str_array(["0", "1"]),
                "offsets": prompt_off,
                "token_ids": prompts,
            },
            "responses": {
                "offsets": offsets,
                "prompt_index": (np.arange(n_responses) % 2).astype(np.int32),
                "sample_index": np.arange(n_responses, dtype=np.int32),
                "finish_reason": str_array(["stop"] * n_responses),
                "correct": np.zeros(n_responses, np.int8),
                "text": str_array(["t"] * n_responses),
                "reward": rng.random(n_responses).astype(np.float32),
            },
            "tokens": {"token_id": flat_ids, "entropy": flat_h, "logprob": -flat_h},
            "vocab": {
                "ids": np.arange(vocab, dtype=np.int32),
                "text": str_array([f"w{i}" for i in range(vocab)]),
            },
        },
        attrs={},
    )


@pytest.fixture
def trace(tmp_path):
    rng = np.random.default_rng(0)
    writer = TraceWriter(tmp_path / "trace")
    tables = {step: step_table(rng) for step in (1, 2, 3)}
    for step, table in tables.items():
        writer.write(step, table, {})
    return tmp_path / "trace", tables


def test_step_list_reads_no_step_file_and_a_step_reads_only_its_own(trace, monkeypatch):
    path, tables = trace
    opened = []
    real = h5py.File
    monkeypatch.setattr(
        h5py, "File", lambda name, *a, **k: opened.append(str(name)) or real(name, *a, **k)
    )
    source = EntropySource(path)
    steps = source.steps()
    assert steps["step"].tolist() == [1, 2, 3] and opened == []
    source.tokens(2, 0)
    assert opened and all(name.endswith("step_000002.h5") for name in opened)


def test_responses_and_tokens_match_the_file(trace):
    path, tables = trace
    source = EntropySource(path.parent)  # a run folder works too
    table = tables[2]
    frame = source.responses(2)
    for i in range(table.n_responses):
        h = table.response_tokens(i, "entropy").astype(np.float64)
        assert frame["length"][i] == len(h)
        if len(h):
            assert frame["mean_entropy"][i] == pytest.approx(h.mean())
            assert frame["max_entropy"][i] == pytest.approx(h.max())
        else:
            assert np.isnan(frame["mean_entropy"][i])
    np.testing.assert_allclose(frame["reward"], table["responses/reward"])
    tokens = source.tokens(2, 0)
    assert tokens["token"].tolist() == [f"w{i}" for i in table.response_tokens(0)]
    assert source.prompt(2, 1) == "p one"
    with pytest.raises(ViewerError, match="no response 99"):
        source.tokens(2, 99)


def test_extreme_tokens_against_brute_force(trace):
    path, tables = trace
    source = EntropySource(path)
    table = tables[3]
    high, low = source.extreme_tokens(3, 4)
    h = table["tokens/entropy"]
    np.testing.assert_allclose(high["entropy"], np.sort(h)[::-1][:4])
    np.testing.assert_allclose(low["entropy"], np.sort(h)[:4])
    for row in high.itertuples():
        assert table.response_tokens(row.response, "entropy")[row.position] == row.entropy


def test_single_entropy_file_is_one_step(tmp_path):
    path = tmp_path / "entropy.h5"
    table = step_table(np.random.default_rng(1))
    write_token_file(path, table)
    source = EntropySource(path)
    steps = source.steps()
    assert steps["step"].tolist() == [0] and steps["tokens"][0] == table.n_tokens
    assert steps["p80"][0] == pytest.approx(
        np.percentile(table["tokens/entropy"].astype(float), 80)
    )
    with pytest.raises(ViewerError, match="give a trace directory or an .h5"):
        EntropySource(tmp_path / "nothing.txt")


def tokens_frame():
    return pd.DataFrame(
        {
            "position": [0, 1, 2, 3],
            "token": [" Wait", ",", " wait", "9"],
            "token_id": [5, 6, 7, 8],
            "entropy": np.array([1.2, 0.001, 0.5, 0.05], dtype=np.float32),
        }
    )


def test_token_view_defaults_hide_nothing_then_filter_search_sort():
    tokens = tokens_frame()
    assert token_view(tokens)["position"].tolist() == [0, 1, 2, 3]
    assert token_view(tokens, low=0.01)["position"].tolist() == [0, 2, 3]
    assert token_view(tokens, high=0.5)["position"].tolist() == [1, 2, 3]
    assert token_view(tokens, search="WAIT")["position"].tolist() == [0, 2]
    assert token_view(tokens, sort="entropy-desc")["position"].tolist() == [0, 2, 3, 1]
    assert token_view(tokens, sort="entropy-asc")["position"].tolist() == [1, 3, 2, 0]
    with pytest.raises(ValueError, match="unknown sort"):
        token_view(tokens, sort="random")


def test_colour_scales_spread_the_near_zero_mass():
    step = np.concatenate([np.full(80, 0.002), np.linspace(0.1, 2.0, 20)])
    linear = (step - step.min()) / (step.max() - step.min())
    log = colour_values(step, "log", step)
    pct = colour_values(step, "percentile", step)
    # The near-zero 80% is one colour on a linear scale, but not bottom-of-scale on log/percentile.
    assert linear[:80].max() < 0.001 and log[:80].min() > 0.25 and pct[0] == pytest.approx(0.8)
    assert np.all(np.diff(colour_values(np.sort(step), "log", step)) >= 0)
    assert len(legend(step, "log")) >= 3 and legend(step, "percentile")[0][0].startswith("P0")


def test_heatmap_has_one_span_per_token_with_tooltip_and_marks():
    page = heatmap_html(tokens_frame(), np.array([0.001, 1.2]), "log", low=0.01, search="wait")
    assert page.count('class="t') == 4
    assert 'title="pos 2 · id 7 · H = 0.5 nats"' in page
    assert page.count(" out") == 1 and page.count(" hit") == 2


def test_per_response_handles_empty_responses_anywhere():
    values = np.array([1.0, 2.0, 5.0])
    offsets = np.array([0, 0, 2, 2, 3, 3])  # empty first, middle and last
    np.testing.assert_array_equal(per_response(values, offsets), [np.nan, 3.0, np.nan, 5.0, np.nan])
    np.testing.assert_array_equal(
        per_response(values, offsets, np.maximum), [np.nan, 2.0, np.nan, 5.0, np.nan]
    )


def test_bad_manifest_lines_and_step_files_are_one_line(trace, tmp_path):
    path, _ = trace
    manifest = path / "manifest.jsonl"
    good = manifest.read_text()
    for bad, expected in [
        ("{not json\n", "manifest.jsonl line 4: not a JSON object with 'step' and 'file'"),
        ('{"step": 9}\n', "line 4: not a JSON object with 'step' and 'file'"),
        ('{"step": 9, "file": "../../etc/passwd"}\n', "step file '../../etc/passwd' is outside"),
    ]:
        manifest.write_text(good + bad)
        with pytest.raises(ViewerError) as caught:
            EntropySource(path)
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    manifest.write_text(good)
    (path / "steps/step_000002.h5").write_bytes(b"not hdf5")
    with pytest.raises(ViewerError, match=r"step_000002.h5: cannot open as HDF5"):
        EntropySource(path).entropy(2)


def test_a_generation_shard_is_refused_by_name(tmp_path):
    shard = tmp_path / "generated.0-of-1.h5"
    with h5py.File(shard, "w") as f:
        f["responses/offsets"] = np.array([0, 2])
        f["tokens/token_id"] = np.array([1, 2], np.int32)
    with pytest.raises(
        ViewerError, match=r"generated.0-of-1.h5: not an entropy file \(no tokens/entropy\)"
    ):
        EntropySource(shard)


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, 20),
        ("", 20),
        ("abc", 20),
        (-5, 1),
        (0, 1),
        (7, 7),
        ("12", 12),
        (1e18, 1000),
        ("nan", 20),
    ],
)
def test_top_k_is_bounded_on_the_server(value, expected):
    from entroflow.viewer.data import parse_top_k

    assert parse_top_k(value) == expected


@pytest.mark.parametrize(
    "value,expected", [(None, None), ("", None), ("x", None), ("inf", None), ("0.5", 0.5)]
)
def test_entropy_bounds_parse_or_mean_no_bound(value, expected):
    from entroflow.viewer.data import parse_bound

    assert parse_bound(value) == expected


def test_callbacks_turn_bad_input_into_one_error_line(capsys):
    from dash.exceptions import PreventUpdate

    from entroflow.viewer.app import one_line_errors

    def show(step):
        raise ViewerError(f"no step {step}")

    with pytest.raises(PreventUpdate):
        one_line_errors(show)(7)
    assert capsys.readouterr().err == "error: no step 7\n"
