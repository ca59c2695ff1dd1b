"""The token-level HDF5 contract: ragged sequences stored flat with CSR offsets.

A `TokenTable` mirrors the file: `groups["responses"]["offsets"]` is `responses/offsets`, and so
on. Writers are atomic (temporary file in the same folder, then rename), so a killed job never
leaves a half-written file under the final name. Readers return numpy arrays and pandas frames.

Layout (see DESIGN.md):
  prompts/   text, answer [P] str; offsets [P+1] int64; token_ids [*] int32; dataset_index [P] int32
  responses/ offsets [N+1] int64; prompt_index, sample_index [N] int32; finish_reason, text [N] str;
             correct [N] int8 (1/0, -1 without a reference answer)
  tokens/    token_id [T] int32; entropy, logprob, engine_logprob [T] float32
  vocab/     ids [V'] int32, text [V'] str: decoded text of every token id that occurs (optional)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from entroflow.errors import EntroflowError
from entroflow.journal import fsync_path

STRING = h5py.string_dtype("utf-8")
CONTRACT_VERSION = 1

# Required datasets per group, with their dtypes (None = string).
REQUIRED = {
    "prompts": {"text": None, "answer": None, "offsets": np.int64, "token_ids": np.int32},
    "responses": {
        "offsets": np.int64,
        "prompt_index": np.int32,
        "sample_index": np.int32,
        "finish_reason": None,
        "correct": np.int8,
        "text": None,
    },
    "tokens": {
        "token_id": np.int32,
        "entropy": np.float32,
        "logprob": np.float32,
        "engine_logprob": np.float32,
    },
}


class ContractError(EntroflowError):
    """A token file does not follow the HDF5 contract."""


def offsets_from_lengths(lengths: Iterable[int]) -> np.ndarray:
    lengths = np.asarray(list(lengths), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def flatten(seqs: Sequence[Sequence], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Ragged sequences -> (flat values, offsets [N+1])."""
    offsets = offsets_from_lengths(len(s) for s in seqs)
    if len(seqs) and offsets[-1]:
        flat = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs])
    else:
        flat = np.zeros(0, dtype=dtype)
    return flat, offsets


def str_array(values: Iterable[str]) -> np.ndarray:
    """Strings for HDF5; NUL (which HDF5 strings cannot hold) is shown as '␀'."""
    return np.asarray([str(v).replace("\x00", "\u2400") for v in values], dtype=object)


@dataclass
class TokenTable:
    """In-memory image of a token file: group -> name -> array, plus file attributes."""

    groups: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, path: str) -> np.ndarray:
        group, name = path.split("/")
        return self.groups[group][name]

    @property
    def n_prompts(self) -> int:
        return len(self.groups["prompts"]["offsets"]) - 1

    @property
    def n_responses(self) -> int:
        return len(self.groups["responses"]["offsets"]) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.groups["responses"]["offsets"][-1])

    def response_slice(self, i: int) -> slice:
        off = self.groups["responses"]["offsets"]
        return slice(int(off[i]), int(off[i + 1]))

    def response_tokens(self, i: int, name: str = "token_id") -> np.ndarray:
        return self.groups["tokens"][name][self.response_slice(i)]

    def prompt_tokens(self, p: int) -> np.ndarray:
        off = self.groups["prompts"]["offsets"]
        return self.groups["prompts"]["token_ids"][off[p] : off[p + 1]]


def _write_dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    values = np.asarray(values)
    kwargs: dict = {}
    if values.dtype == object or values.dtype.kind in "US":
        values = values.astype(object)
        kwargs["dtype"] = STRING
    if values.size:
        # Chunked + compressed; chunks of ~64k elements keep random access to one response cheap.
        kwargs.update(
            chunks=(min(len(values), 65536),) + values.shape[1:],
            compression="gzip",
            compression_opts=4,
        )
        if "dtype" not in kwargs:
            kwargs["shuffle"] = True
    group.create_dataset(name, data=values, **kwargs)


def atomic_temp(path: Path) -> str:
    """A temporary file beside `path` with the mode a plain open() would give (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def write_token_file(path: str | os.PathLike, table: TokenTable) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    try:
        with h5py.File(tmp, "w") as f:
            for gname, datasets in table.groups.items():
                g = f if gname == "" else f.require_group(gname)  # "" = the file's root
                for name, values in datasets.items():
                    _write_dataset(g, name, values)
            attrs = {
                "contract_version": CONTRACT_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **table.attrs,
            }
            for key, value in attrs.items():
                f.attrs[key] = "" if value is None else value
        fsync_path(tmp)  # complete on disk before it takes the final name
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_dataset(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=object)
    return ds[()]


def _decode_attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_token_file(
    path: str | os.PathLike, groups: Sequence[str] | None = None, root: str = ""
) -> TokenTable:
    """Read a whole token file (or only some groups) into memory, checking it opens cleanly.

    `root` reads a token table nested in a bigger file (e.g. "e_batch" in a ΔH file); datasets
    directly under `root` come back as the group "".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            base = f[root] if root else f
            names = (
                [k for k in base if isinstance(base[k], h5py.Group)]
                if groups is None
                else [g for g in groups if g]
            )
            loaded = {
                g: {n: _read_dataset(d) for n, d in base[g].items() if isinstance(d, h5py.Dataset)}
                for g in names
                if g in base
            }
            top = {n: _read_dataset(d) for n, d in base.items() if isinstance(d, h5py.Dataset)}
            if top and (groups is None or "" in groups):
                loaded[""] = top
            table = TokenTable(
                groups=loaded, attrs={k: _decode_attr(v) for k, v in f.attrs.items()}
            )
    except OSError as err:
        raise ContractError(
            f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}"
        ) from err
    return table


def check_contract(
    table: TokenTable, name: str = "token file", require_scores: bool = True
) -> None:
    """Raise ContractError naming the first problem: missing datasets, dtypes, offsets, shapes."""
    for gname, fields in REQUIRED.items():
        group = table.groups.get(gname)
        if group is None:
            raise ContractError(f"{name}: missing group '{gname}/'")
        for fname, dtype in fields.items():
            if not require_scores and gname == "tokens" and fname in ("entropy", "logprob"):
                continue
            if fname not in group:
                raise ContractError(f"{name}: missing dataset '{gname}/{fname}'")
            values = group[fname]
            if dtype is None:
                if values.dtype != object:
                    raise ContractError(f"{name}: '{gname}/{fname}' must hold strings")
            elif values.dtype != dtype:
                raise ContractError(
                    f"{name}: '{gname}/{fname}' has dtype {values.dtype}, expected {np.dtype(dtype)}"
                )
    for gname, n_flat in (("prompts", "token_ids"), ("responses", None)):
        off = table.groups[gname]["offsets"]
        if len(off) == 0 or off[0] != 0 or np.any(np.diff(off) < 0):
            raise ContractError(f"{name}: '{gname}/offsets' must start at 0 and not decrease")
        flat = table.groups[gname][n_flat] if n_flat else table.groups["tokens"]["token_id"]
        if off[-1] != len(flat):
            raise ContractError(
                f"{name}: '{gname}/offsets' ends at {off[-1]} but there are {len(flat)} tokens"
            )
    n_p, n_r, n_t = table.n_prompts, table.n_responses, len(table["tokens/token_id"])
    for path, expected in [
        ("prompts/text", n_p),
        ("prompts/answer", n_p),
        *[(f"responses/{k}", n_r) for k in REQUIRED["responses"] if k != "offsets"],
        *[(f"tokens/{k}", n_t) for k in REQUIRED["tokens"] if k in table.groups["tokens"]],
    ]:
        if len(table[path]) != expected:
            raise ContractError(
                f"{name}: '{path}' has {len(table[path])} rows, expected {expected}"
            )
    pidx = table["responses/prompt_index"]
    if n_r and (pidx.min() < 0 or pidx.max() >= n_p):
        raise ContractError(f"{name}: 'responses/prompt_index' points outside prompts/ (P={n_p})")


def load_checked(path: str | os.PathLike, require_scores: bool = True) -> TokenTable:
    """read_token_file + check_contract, with the file's path in every error."""
    table = read_token_file(path)
    check_contract(table, name=str(path), require_scores=require_scores)
    return table


def concat_token_tables(tables: Sequence[TokenTable], attrs: dict | None = None) -> TokenTable:
    """Concatenate files along prompts and responses (shards -> one file), re-indexing offsets."""
    if not tables:
        raise ValueError("nothing to concatenate")
    out: dict[str, dict[str, np.ndarray]] = {}
    p_shift = 0
    per_group: dict[str, dict[str, list[np.ndarray]]] = {}
    for t in tables:
        for gname, datasets in t.groups.items():
            for name, values in datasets.items():
                if name == "offsets":
                    continue
                if gname == "responses" and name == "prompt_index":
                    values = values + np.int32(p_shift)
                per_group.setdefault(gname, {}).setdefault(name, []).append(values)
        p_shift += t.n_prompts
    for gname, datasets in per_group.items():
        if gname == "vocab":
            continue
        out[gname] = {name: np.concatenate(parts) for name, parts in datasets.items()}
    out["prompts"]["offsets"] = offsets_from_lengths(
        n for t in tables for n in np.diff(t["prompts/offsets"])
    )
    out["responses"]["offsets"] = offsets_from_lengths(
        n for t in tables for n in np.diff(t["responses/offsets"])
    )
    if "vocab" in per_group:
        ids = np.concatenate(per_group["vocab"]["ids"])
        texts = np.concatenate(per_group["vocab"]["text"])
        ids, first = np.unique(ids, return_index=True)
        out["vocab"] = {"ids": ids.astype(np.int32), "text": texts[first]}
    return TokenTable(groups=out, attrs=dict(attrs if attrs is not None else tables[0].attrs))


def vocab_group(token_ids: np.ndarray, tokenizer) -> dict[str, np.ndarray]:
    """Decoded text of each distinct token id, so a file can be read without its tokenizer."""
    ids = np.unique(np.asarray(token_ids, dtype=np.int32))
    texts = [tokenizer.decode([int(i)]) for i in ids]
    return {"ids": ids, "text": str_array(texts)}


def token_texts(table: TokenTable, token_ids: np.ndarray) -> np.ndarray:
    """Map token ids to their decoded text through the file's vocab/ group."""
    vocab = table.groups.get("vocab")
    if vocab is None:
        raise ContractError("file has no vocab/ group: decode token ids with the model's tokenizer")
    lookup = dict(zip(vocab["ids"].tolist(), vocab["text"].tolist(), strict=True))
    return np.asarray([lookup.get(int(i), f"<{int(i)}>") for i in token_ids], dtype=object)


def per_response(values: np.ndarray, offsets: np.ndarray, ufunc=np.add) -> np.ndarray:
    """`ufunc.reduce` of each response's slice of a flat token array; NaN for empty responses."""
    values = np.asarray(values, dtype=np.float64)
    lengths = np.diff(offsets)
    out = np.full(len(lengths), np.nan)
    has = lengths > 0
    if has.any():
        # reduceat over the non-empty responses' starts only: empty ones own no tokens, so each
        # segment runs exactly to the next non-empty start (or the end of the array).
        out[has] = ufunc.reduceat(values, offsets[:-1][has])
    return out


def responses_frame(table: TokenTable) -> pd.DataFrame:
    """One row per response: indices, finish reason, correctness, length and entropy summary."""
    off = table["responses/offsets"]
    lengths = np.diff(off)
    frame = pd.DataFrame(
        {
            "response": np.arange(table.n_responses),
            "prompt_index": table["responses/prompt_index"],
            "sample_index": table["responses/sample_index"],
            "finish_reason": table["responses/finish_reason"],
            "correct": table["responses/correct"],
            "length": lengths,
        }
    )
    if "entropy" in table.groups["tokens"]:
        with np.errstate(invalid="ignore", divide="ignore"):  # empty responses: NaN
            frame["mean_entropy"] = per_response(table["tokens/entropy"], off) / lengths
    frame["text"] = table["responses/text"]
    return frame


def tokens_frame(table: TokenTable, with_text: bool = True) -> pd.DataFrame:
    """Tidy token table: one row per generated token, with its response and position."""
    off = table["responses/offsets"]
    lengths = np.diff(off)
    response = np.repeat(np.arange(table.n_responses), lengths)
    position = np.arange(len(response)) - np.repeat(off[:-1], lengths)
    data = {
        "response": response,
        "prompt_index": table["responses/prompt_index"][response],
        "sample_index": table["responses/sample_index"][response],
        "position": position,
    }
    for name, values in table.groups["tokens"].items():
        data[name] = values
    frame = pd.DataFrame(data)
    if with_text and "vocab" in table.groups:
        frame["token"] = token_texts(table, frame["token_id"].to_numpy())
    return frame


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a temporary file beside it, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def read_tokens(path: str | os.PathLike, with_text: bool = True) -> pd.DataFrame:
    """`tokens_frame` of a checked entropy file."""
    return tokens_frame(load_checked(path), with_text=with_text)


def read_responses(path: str | os.PathLike) -> pd.DataFrame:
    """`responses_frame` of a checked entropy file."""
    return responses_frame(load_checked(path))
