"""What the viewer shows, read lazily from a trace directory or one entropy file.

A trace directory (`manifest.jsonl` + `steps/step_*.h5`, written by training) has one HDF5 file
per step; the step list comes from the manifest alone, and a step's file is opened only when the
step is selected. A single `entropy.h5` is shown as one step (0). Within a step, one response's
tokens are read by slicing the HDF5 datasets, so opening a response of a 32k-token step does not
read the other responses' tokens twice.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from entroflow.errors import EntroflowError
from entroflow.io import per_response

PERCENTILES = (50, 80, 90, 95, 99)


class ViewerError(EntroflowError):
    pass


def _strings(ds: h5py.Dataset, index=slice(None)) -> np.ndarray:
    return np.asarray(ds.asstr()[index], dtype=object)


def step_statistics(entropy: np.ndarray) -> dict:
    h = np.asarray(entropy, dtype=np.float64)
    if h.size == 0:
        return {"tokens": 0}
    stats = {"tokens": int(h.size), "mean": float(h.mean()), "max": float(h.max())}
    stats |= {f"p{q}": float(np.percentile(h, q)) for q in PERCENTILES}
    return stats


REQUIRED = ("tokens/entropy", "tokens/token_id", "responses/offsets")
MAX_TOP_K = 1000  # rows of the top-K tables (the browser bounds it too; the server decides)


def read_manifest(manifest: Path) -> list[dict]:
    """The manifest's rows; a line that is not a JSON object with `step` and `file` is named."""
    rows = []
    for number, line in enumerate(manifest.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"]), str(row["file"])
        except (ValueError, KeyError, TypeError):
            raise ViewerError(
                f"{manifest} line {number}: not a JSON object with 'step' and 'file'"
            ) from None
        rows.append(row)
    return rows


def step_file(trace: Path, name: str) -> Path:
    """A step file named by the manifest, which must lie inside the trace folder."""
    path = (trace / name).resolve()
    if not path.is_relative_to(trace.resolve()):
        raise ViewerError(f"{trace / 'manifest.jsonl'}: step file {name!r} is outside {trace}")
    return path


def parse_top_k(value, default: int = 20) -> int:
    """The top-K input as the server accepts it: an integer in [1, MAX_TOP_K]."""
    try:
        k = int(float(value))
    except (TypeError, ValueError, OverflowError):
        return default
    return min(max(k, 1), MAX_TOP_K)


def parse_bound(value) -> float | None:
    """An entropy-range input: a finite number, else no bound."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


class EntropySource:
    """Steps, responses and tokens of a trace directory or an entropy file, read on demand."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir() and (path / "trace" / "manifest.jsonl").exists():
            path = path / "trace"  # a run folder: its trace
        self.path = path
        if path.is_dir():
            manifest = path / "manifest.jsonl"
            if not manifest.exists():
                raise ViewerError(f"{path}: no manifest.jsonl (expected a trace directory)")
            rows = read_manifest(manifest)
            if not rows:
                raise ViewerError(f"{manifest}: no steps yet")
            self._files = {int(r["step"]): step_file(path, r["file"]) for r in rows}
            self._manifest = pd.DataFrame(rows).drop(columns=["file"]).sort_values("step")
        elif path.suffix == ".h5" and path.is_file():
            self._files = {0: path}
            self._manifest = None
            with self._file(0):  # refuses a file without token entropies up front
                pass
        else:
            raise ViewerError(f"{path}: give a trace directory or an .h5 entropy file")

    @property
    def kind(self) -> str:
        return "trace" if self._manifest is not None else "entropy file"

    def steps(self) -> pd.DataFrame:
        """One row per step: the manifest's statistics (computed for a single entropy file)."""
        if self._manifest is not None:
            return self._manifest.reset_index(drop=True)
        return pd.DataFrame([{"step": 0, **step_statistics(self.entropy(0))}])

    def _file(self, step: int) -> h5py.File:
        if step not in self._files:
            raise ViewerError(f"no step {step}; available: {sorted(self._files)[:10]}...")
        path = self._files[step]
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise ViewerError(f"{path}: cannot open as HDF5 ({err})") from None
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            f.close()
            raise ViewerError(
                f"{path}: not an entropy file (no {', '.join(missing)}); a generation shard "
                "(generated.*.h5) has no entropies yet: open its scored.*.h5 or entropy.h5"
            )
        return f

    @lru_cache(maxsize=8)  # noqa: B019 (one source per viewer process)
    def entropy(self, step: int) -> np.ndarray:
        """All token entropies of a step, float32 [T]."""
        with self._file(step) as f:
            return f["tokens/entropy"][()]

    @lru_cache(maxsize=8)  # noqa: B019
    def responses(self, step: int) -> pd.DataFrame:
        """One row per response: length, mean/max entropy, and whatever the file records."""
        entropy = self.entropy(step)
        with self._file(step) as f:
            r = f["responses"]
            off = r["offsets"][()]
            lengths = np.diff(off)
            frame = pd.DataFrame({"response": np.arange(len(lengths)), "length": lengths})
            with np.errstate(invalid="ignore", divide="ignore"):
                frame["mean_entropy"] = per_response(entropy, off) / lengths
            frame["max_entropy"] = per_response(entropy, off, np.maximum)
            for name in ("reward", "advantage", "correct", "group", "prompt_index"):
                if name in r:
                    frame[name] = r[name][()]
            if "sample_index" in r:
                frame["sample"] = r["sample_index"][()]
            if "finish_reason" in r:
                frame["finish"] = _strings(r["finish_reason"])
        frame.attrs["offsets"] = off
        return frame

    @lru_cache(maxsize=8)  # noqa: B019
    def vocab(self, step: int) -> dict[int, str]:
        with self._file(step) as f:
            if "vocab" not in f:
                return {}
            return dict(zip(f["vocab/ids"][()].tolist(), _strings(f["vocab/text"]), strict=True))

    def texts(self, step: int, token_ids) -> list[str]:
        """Decoded text of each token id, through the step file's vocab/ group."""
        vocab = self.vocab(step)
        return [vocab.get(int(i), f"<{int(i)}>") for i in token_ids]

    def prompt(self, step: int, response: int) -> str:
        frame = self.responses(step)
        with self._file(step) as f:
            if "prompt_index" not in frame or "prompts/text" not in f:
                return ""
            return str(_strings(f["prompts/text"], int(frame["prompt_index"][response])))

    def tokens(self, step: int, response: int) -> pd.DataFrame:
        """One response's tokens: position, token text, token id, entropy, log-prob."""
        off = self.responses(step).attrs["offsets"]
        if not 0 <= response < len(off) - 1:
            raise ViewerError(f"step {step} has no response {response}")
        sl = slice(int(off[response]), int(off[response + 1]))
        with self._file(step) as f:
            ids = f["tokens/token_id"][sl]
            frame = pd.DataFrame(
                {
                    "position": np.arange(len(ids)),
                    "token_id": ids,
                    "entropy": f["tokens/entropy"][sl],
                }
            )
            if "logprob" in f["tokens"]:
                frame["logprob"] = f["tokens/logprob"][sl]
        frame.insert(1, "token", self.texts(step, ids))
        return frame

    def extreme_tokens(self, step: int, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The k highest- and k lowest-entropy tokens of a step, with response and position."""
        entropy = self.entropy(step)
        off = self.responses(step).attrs["offsets"]
        k = min(k, len(entropy))
        order = np.argsort(entropy, kind="stable")
        with self._file(step) as f:
            ids = f["tokens/token_id"]

            def rows(index: np.ndarray) -> pd.DataFrame:
                index = np.sort(index)
                response = np.searchsorted(off, index, side="right") - 1
                frame = pd.DataFrame(
                    {
                        "token_id": ids[index] if len(index) else np.zeros(0, np.int32),
                        "entropy": entropy[index],
                        "response": response,
                        "position": index - off[response],
                    }
                )
                frame.insert(0, "token", self.texts(step, frame["token_id"]))
                return frame

            high = rows(order[::-1][:k]).sort_values("entropy", ascending=False, kind="stable")
            low = rows(order[:k]).sort_values("entropy", kind="stable")
        return high.reset_index(drop=True), low.reset_index(drop=True)

    def high_entropy_counts(self, step: int, percentile: float = 80) -> pd.Series:
        """How often each token text occurs above the step's P`percentile` (for a word cloud)."""
        entropy = self.entropy(step)
        if not len(entropy):
            return pd.Series(dtype=int)
        with self._file(step) as f:
            ids = f["tokens/token_id"][()]
        above = ids[entropy > np.percentile(entropy, percentile)]
        texts = pd.Series(self.texts(step, above)).str.strip()
        return texts[texts != ""].value_counts()
