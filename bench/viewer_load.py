"""How fast the viewer opens a big step: 16 responses x 32k tokens (vocabulary 151,936).

Writes a synthetic 3-step trace to a temporary folder, then times what selecting step 2 and one
of its responses costs in the viewer's data layer and renderer, against the usual baseline of
loading the whole step into a pandas token table and grouping it by response (same process).
Also counts the files the step list and a step selection open (the step list: none).

Run: .venv/bin/python bench/viewer_load.py   (part of `make bench`)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from entroflow.io import TokenTable, flatten, read_token_file, str_array, tokens_frame
from entroflow.training.traces import TraceWriter
from entroflow.viewer.data import EntropySource
from entroflow.viewer.figures import word_cloud_src
from entroflow.viewer.render import heatmap_html, token_view

RESPONSES, LENGTH, VOCAB, STEPS = 16, 32_768, 151_936, 3


def synthetic_step(rng: np.random.Generator) -> TokenTable:
    ids = [rng.integers(0, VOCAB, LENGTH, dtype=np.int32) for _ in range(RESPONSES)]
    entropy = [rng.exponential(0.2, LENGTH).astype(np.float32) for _ in range(RESPONSES)]
    flat_ids, offsets = flatten(ids, np.int32)
    flat_h, _ = flatten(entropy, np.float32)
    seen = np.unique(flat_ids)
    return TokenTable(
        groups={
            "prompts": {
                "text": str_array(["a prompt"]),
                "answer": str_array(["1"]),
                "offsets": np.array([0, 3]),
                "token_ids": np.array([1, 2, 3], dtype=np.int32),
            },
            "responses": {
                "offsets": offsets,
                "prompt_index": np.zeros(RESPONSES, np.int32),
                "sample_index": np.arange(RESPONSES, dtype=np.int32),
                "finish_reason": str_array(["length"] * RESPONSES),
                "correct": np.zeros(RESPONSES, np.int8),
                "text": str_array([""] * RESPONSES),
                "reward": np.zeros(RESPONSES, np.float32),
            },
            "tokens": {"token_id": flat_ids, "entropy": flat_h, "logprob": -flat_h},
            "vocab": {"ids": seen, "text": str_array([f"t{i}" for i in seen])},
        },
        attrs={},
    )


def timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:7.3f} s")
    return value, seconds


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = TraceWriter(Path(tmp) / "trace")
        for step in range(1, STEPS + 1):
            writer.write(step, synthetic_step(rng), {})
        step_file = writer.step_path(2)
        print(
            f"trace: {STEPS} steps of {RESPONSES} x {LENGTH:,} tokens "
            f"({step_file.stat().st_size / 2**20:.0f} MiB per step file)"
        )
        opened: list[str] = []
        real_file = h5py.File

        def counting(name, *args, **kwargs):
            opened.append(Path(name).name)
            return real_file(name, *args, **kwargs)

        h5py.File = counting
        try:
            source, _ = timed("step list (manifest only)", lambda: EntropySource(writer.dir))
            timed("  steps()", source.steps)
            print(f"  files opened for the step list: {len(opened)}")
            opened.clear()
            total = 0.0
            for label, fn in (
                ("select step 2: responses overview", lambda: source.responses(2)),
                ("step 2: top-20 highest/lowest tokens", lambda: source.extreme_tokens(2, 20)),
                ("step 2: word cloud", lambda: word_cloud_src(source.high_entropy_counts(2))),
                ("open response 5: tokens", lambda: source.tokens(2, 5)),
            ):
                _, seconds = timed(label, fn)
                total += seconds
            tokens = source.tokens(2, 5)
            _, seconds = timed(
                "response 5: heat-map HTML (32k spans)",
                lambda: heatmap_html(tokens, source.entropy(2), "log", search="t1"),
            )
            total += seconds
            _, seconds = timed(
                "response 5: filtered, sorted view",
                lambda: token_view(tokens, 0.1, sort="entropy-desc"),
            )
            total += seconds
            print(f"  files opened for step 2: {sorted(set(opened))}")
        finally:
            h5py.File = real_file
        _, baseline = timed(
            "baseline: pandas load + per-response stats", lambda: pandas_way(step_file)
        )
        print(
            f"opening step 2 + one response: {total:.2f} s "
            f"= {total / baseline:.2f}x loading the step into pandas the usual way"
        )


def pandas_way(path: Path):
    """What one would do by hand: the whole step as a token DataFrame, then group by response."""
    tokens = tokens_frame(read_token_file(path), with_text=True)
    return tokens.groupby("response")["entropy"].agg(["mean", "max", "size"])


if __name__ == "__main__":
    main()
