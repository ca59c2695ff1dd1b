"""Dataset registry: presets, field mapping and errors, on local fixture files per entry shape."""

import json

import pandas as pd
import pytest

from entroflow.data.datasets import (
    PRESETS,
    DatasetError,
    extract_answer,
    load_problems,
    resolve_entry,
)


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


# Fixture rows shaped like each hub preset's real columns, read through the preset's mapping.
PRESET_ROWS = {
    "hmmt_feb_2025": [{"problem_idx": 1, "problem": "Compute $1+1$.", "answer": "2"}],
    "aime_2025": [{"problem_idx": 1, "problem": "Find $x$.", "answer": "70"}],
    "math_500": [
        {"problem": "What is $\\frac12$?", "answer": "\\frac{1}{2}", "unique_id": "test/x/1.json"}
    ],
    "gsm8k": [{"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 1,007"}],
    "aime24": [{"id": 60, "problem": "Find $m+n$.", "solution": "...", "answer": "204"}],
    "aime25": [{"problem": "Find the sum.", "answer": "70"}],
    "amc": [{"id": 0, "problem": "What is $x$?", "answer": 142.0, "url": "https://x"}],
    "minerva": [
        {
            "problem": "Compute the speed.",
            "solution": "So $v = \\boxed{4.5 \\times 10^{3}}$ m/s. Final answer: 4.5e3.",
            "type": "Physics",
            "idx": 0,
        }
    ],
}
EXPECTED_ANSWER = {
    "gsm8k": "1007",
    "math_500": "\\frac{1}{2}",
    "amc": "142.0",
    "minerva": "4.5 \\times 10^{3}",
}
EXPECTED_ID = {"math_500": "test/x/1.json", "aime24": "60", "amc": "0"}


@pytest.mark.parametrize("preset", sorted(PRESET_ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_preset_field_mapping_on_local_files(tmp_path, preset, suffix):
    """Each preset's columns, read from a local file through the same code path as the hub."""
    path = write_rows(tmp_path / f"data{suffix}", PRESET_ROWS[preset])
    frame = load_problems("d", {"preset": preset, "source": "local", "path": str(path)})
    row = PRESET_ROWS[preset][0]
    assert list(frame.columns) == ["id", "problem", "answer", "prompt"]
    assert frame.problem[0] == str(row[PRESETS[preset]["problem_field"]])
    assert frame.prompt[0].startswith(frame.problem[0]) and "\\boxed{}" in frame.prompt[0]
    assert frame.answer[0] == EXPECTED_ANSWER.get(preset, row.get("answer"))
    assert frame.id[0] == EXPECTED_ID.get(preset, "d-0")


def test_preset_names_of_maxent_grpo_and_the_old_alias():
    hub = {name: (PRESETS[name]["path"], PRESETS[name]["split"]) for name in EXPECTED_HUB}
    assert hub == EXPECTED_HUB
    old = resolve_entry("x", {"preset": "math500"})
    assert old == resolve_entry("x", {"preset": "math_500"}) and old["source"] == "hub"


EXPECTED_HUB = {  # maxent-grpo's evaluation presets (hub id, split)
    "math_500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "aime25": ("yentinglin/aime_2025", "train"),
    "amc": ("AI-MO/aimo-validation-amc", "train"),
    "minerva": ("svc-huggingface/minerva-math", "test"),
}


def test_preset_boxed_answers_take_the_last_balanced_box():
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{a}{b}}.", "boxed") == "\\frac{a}{b}"
    assert extract_answer("no box here", "boxed") == ""
    assert extract_answer("\\boxed{unclosed", "boxed") == ""


def test_hub_presets_name_the_real_datasets():
    assert PRESETS["hmmt_feb_2025"]["path"] == "MathArena/hmmt_feb_2025"
    assert PRESETS["hmmt_feb_2025"]["split"] == "train"
    assert PRESETS["gsm8k"]["name"] == "main"


def test_builtin_arithmetic_is_deterministic():
    a = load_problems("a", {"preset": "arithmetic", "n": 10, "seed": 3})
    b = load_problems("a", {"preset": "arithmetic", "n": 10, "seed": 3})
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 10 and a.problem[0].startswith("What is")
    assert eval(a.problem[0][8:-1]) == int(a.answer[0])


def test_limit_and_template(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": str(i)} for i in range(5)])
    entry = {
        "source": "local",
        "path": str(path),
        "problem_field": "q",
        "answer_field": "a",
        "limit": 2,
        "prompt_template": "Solve: {problem} in {{braces}}",
    }
    frame = load_problems("d", entry)
    assert frame.prompt.tolist() == ["Solve: p0 in {braces}", "Solve: p1 in {braces}"]


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            {"preset": "nope"},
            "unknown dataset preset 'nope'; available: aime24, aime25, aime_2025, amc, arithmetic",
        ),
        ({"source": "ftp"}, "source must be one of"),
        ({"source": "local"}, "needs a 'path'"),
        ({"source": "local", "path": "/no/such/file.jsonl"}, "not found"),
        ({"source": "builtin", "builtin": "sudoku"}, "unknown builtin dataset 'sudoku'"),
    ],
)
def test_bad_entries(entry, message):
    with pytest.raises(DatasetError, match=message):
        load_problems("d", entry)


def test_missing_field_and_empty_file(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(
        DatasetError, match="problem_field 'problem' is not a column; available: question, answer"
    ):
        load_problems("d", {"source": "local", "path": str(path)})
    empty = tmp_path / "e.csv"
    empty.write_text("problem,answer\n")
    with pytest.raises(DatasetError, match="dataset 'd' is empty"):
        load_problems("d", {"source": "local", "path": str(empty)})


def test_gsm8k_answers():
    assert extract_answer("work\n#### 42", "gsm8k") == "42"
    assert extract_answer("no marker", "gsm8k") == ""
