"""Detailed logs of one checkpoint stage: what a researcher needs to debug an estimator on one
checkpoint without rerunning it (settings: `LoggingSettings`, runs.<name>.delta_h.logging and
.fisher.logging).

Files go to the checkpoint's log directory beside the rule's log (`log_folder`:
logs/estimate_delta_h/{run}.{step}/ for logs/estimate_delta_h/{run}.{step}.log), each named
`<stamp>.<name>` with one stamp per stage run, so reruns of a checkpoint sit side by side and
`max_files` rotates the oldest out. Every file is written atomically (a temporary file renamed
into place). At level standard with no switch on nothing is written and no record is built: the
stages guard every record with the flags below, so the logs cost nothing there, and they never
change the stage's numbers (its result file is the same at every level).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from entroflow.checkpoint.settings import LoggingSettings
from entroflow.io import atomic_temp

log = logging.getLogger(__name__)
RULE_LOG_LEVEL = {"minimal": logging.WARNING, "debug": logging.DEBUG}  # others: unchanged


def log_folder(rule_log: str | os.PathLike) -> Path:
    """The checkpoint's log directory beside its rule log: logs/<rule>/{run}.{step}/."""
    path = Path(rule_log)
    return path.with_name(path.name.removesuffix(".log"))


def plain(value):
    """JSON-able: numpy scalars and arrays as Python numbers and lists, NaN / ±inf as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return [None if not math.isfinite(x) else x for x in value.ravel().tolist()]
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StageLog:
    """One stage run's detailed log files. `detailed`, `sequences`, `tokens`, `tensors` say
    which records the stage should build; a disabled log (no folder) has all four off."""

    def __init__(self, folder: str | os.PathLike | None, settings: LoggingSettings | None = None):
        self.settings = settings or LoggingSettings()
        self.folder = None if folder is None else Path(folder)
        on = self.folder is not None
        self.detailed = on and self.settings.detailed
        self.sequences = on and self.settings.switch("log_sequences")
        self.tokens = on and self.settings.switch("log_tokens")
        self.tensors = on and self.settings.switch("log_raw_tensors")
        now = _dt.datetime.now(_dt.timezone.utc)
        self.stamp = now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z"
        self.written: list[Path] = []

    @property
    def active(self) -> bool:
        return self.detailed or self.sequences or self.tokens or self.tensors

    def path(self, name: str) -> Path:
        """Where file `name` of this run goes (`.gz` added to text files when compressing)."""
        text = name.endswith((".json", ".jsonl"))
        suffix = ".gz" if text and self.settings.compress else ""
        return self.folder / f"{self.stamp}.{name}{suffix}"

    def _write(self, name: str, write) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_temp(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if path not in self.written:
            self.written.append(path)
        return path

    def _write_text(self, name: str, text: str) -> Path:
        data = text.encode()

        def write(tmp):
            if self.settings.compress:
                with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                    f.write(data)
            else:
                Path(tmp).write_bytes(data)

        return self._write(name, write)

    def jsonl(self, name: str, records: Iterable[dict]) -> Path:
        """`name` (e.g. "eta_sweep.jsonl") with one JSON object per line."""
        lines = (json.dumps(plain(r), ensure_ascii=False) for r in records)
        return self._write_text(name, "".join(line + "\n" for line in lines))

    def json(self, name: str, record: dict) -> Path:
        return self._write_text(name, json.dumps(plain(record), indent=1, ensure_ascii=False))

    def npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        save = np.savez_compressed if self.settings.compress else np.savez

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: numpy would add .npz to a path
                save(f, **{k: np.asarray(v) for k, v in arrays.items()})

        return self._write(name, write)

    def torch(self, name: str, obj) -> Path:
        import torch

        def write(tmp):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            Path(tmp).write_bytes(buffer.getvalue())

        return self._write(name, write)

    def finish(self) -> list[Path]:
        """Rotate the folder to max_files (oldest first, never this run's files); log what was
        written and removed. Returns the removed files."""
        if not self.written:
            return []
        limit = self.settings.max_files
        mine = set(self.written)
        others = [p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        others = sorted((p for p in others if p not in mine), key=lambda p: p.stat().st_mtime)
        excess = len(others) + len(mine) - limit
        removed = others[: max(excess, 0)]
        for p in removed:
            p.unlink(missing_ok=True)
        size = sum(p.stat().st_size for p in self.written)
        log.info(
            "detailed logs (level %s): %d files, %.1f MB in %s, stamp %s",
            self.settings.level,
            len(self.written),
            size / 1e6,
            self.folder,
            self.stamp,
        )
        if removed:
            log.info(
                "detailed logs: removed %d older files (max_files %d): %s",
                len(removed),
                limit,
                ", ".join(p.name for p in removed),
            )
        if len(mine) > limit:
            log.warning(
                "detailed logs: this run wrote %d files, more than max_files (%d)", len(mine), limit
            )
        return removed


@contextlib.contextmanager
def rule_log_level(settings: LoggingSettings):
    """The package's log level for the stage: warnings only at minimal (the script's summary
    line after the stage stays), debug lines at debug, unchanged otherwise."""
    level = RULE_LOG_LEVEL.get(settings.level)
    logger = logging.getLogger("entroflow")
    old = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def interval_record(interval, i: int) -> dict:
    """One `Interval` at η index i as {value, ci, stderr}."""
    return {
        "value": interval.value[i],
        "ci": [interval.ci[i, 0], interval.ci[i, 1]],
        "stderr": interval.stderr[i],
    }


def parameter_stats(tensors: dict) -> dict[str, np.ndarray]:
    """Per parameter (name order): size, norm, min, mean, median, max of a tensor dict."""
    names = list(tensors)
    arrays = [tensors[n].detach().double().cpu().numpy().ravel() for n in names]
    return {
        "name": np.asarray(names),
        "size": np.array([a.size for a in arrays]),
        "norm": np.array([np.linalg.norm(a) for a in arrays]),
        "min": np.array([a.min() for a in arrays]),
        "mean": np.array([a.mean() for a in arrays]),
        "median": np.array([np.median(a) for a in arrays]),
        "max": np.array([a.max() for a in arrays]),
    }


def _sums(columns: list[np.ndarray]) -> np.ndarray:
    return np.array([float(np.sum(c)) for c in columns])


class DeltaHLog(StageLog):
    """The ΔH stage's records (files in README, "Detailed logs of a checkpoint stage")."""

    def __init__(self, folder=None, settings: LoggingSettings | None = None):
        super().__init__(folder, settings)
        self.rounds: list[dict] = []
        self.u_scores = None  # the covariance predictor's JVP on the kept U sequences
        self.eta_at_lr = None
        self.tokens_at_lr: dict[
            str, list[np.ndarray]
        ] = {}  # "" / "_minus": per-token H at θ ± lr·v

    def sweep_scores(self, eta: float, suffix: str, scores) -> None:
        """Keep the per-token entropies the sweep found at θ ± lr·v (log_tokens only)."""
        if self.tokens and eta == self.eta_at_lr:
            self.tokens_at_lr[suffix] = [e.detach().double().cpu().numpy() for e in scores.entropy]

    def update(self, step, adam_factor: float, cov_per_unit: np.ndarray) -> None:
        """The replayed update: global norms (detailed), per-parameter statistics and the
        tensors themselves (log_raw_tensors)."""
        parts = {
            "direction": step.direction,
            "gradient_part": step.gradient_part,
            "remainder": step.remainder,
            "denominator": step.denominator,
        }
        if self.detailed:
            stats = {k: parameter_stats(v) for k, v in parts.items()}
            self.json(
                "update.json",
                {
                    "lr": step.lr,
                    "adam_gradient_factor": adam_factor,
                    "parameters": int(stats["direction"]["size"].sum()),
                    "tensors": len(step.direction),
                    **{
                        f"{k}_norm": float(np.linalg.norm(stats[k]["norm"]))
                        for k in ("direction", "gradient_part", "remainder")
                    },
                    "denominator_min": stats["denominator"]["min"].min(),
                    "denominator_max": stats["denominator"]["max"].max(),
                    "covariance_per_unit_step": {
                        "value": cov_per_unit[0],
                        "stderr": np.nanstd(cov_per_unit[1:], ddof=1)
                        if len(cov_per_unit) > 2
                        else None,
                    },
                },
            )
        if self.tensors:
            self.npz(
                "update_stats.npz",
                {f"{k}_{s}": v for k, d in parts.items() for s, v in parameter_stats(d).items()},
            )
            self.torch(
                "update.pt",
                {k: {n: t.detach().cpu() for n, t in d.items()} for k, d in parts.items()},
            )

    def growth_round(self, batch, samples: int, est, slopes, half: float, at_lr: int, why: str):
        """One E-batch round: its running estimate at η = lr and the decision (rewritten each
        round, so a stage that dies mid-growth leaves its rounds)."""
        if not self.detailed:
            return
        reps = slopes["total"]
        self.rounds.append(
            {
                "round": len(self.rounds),
                "e_responses": len(batch.gens),
                "samples_per_prompt": samples,
                "eta": est.eta[at_lr],
                "delta_h": interval_record(est.truth, at_lr),
                "first_order": interval_record(est.first_order, at_lr),
                "nonlinearity": interval_record(est.nonlinearity, at_lr),
                "relative_half_width": half,
                "slope_total": reps[0],
                "slope_total_stderr": np.std(reps[1:], ddof=1) if len(reps) > 2 else None,
                "decision": why,
            }
        )
        self.jsonl("growth.jsonl", self.rounds)

    def result(self, result, batch, sweep, slopes, cov_per_unit, e_rows, u_batch, problems, tok):
        """Everything else at the end: the sweep per η, per-sequence and per-token records,
        texts, the bootstrap replicates."""
        est, lr = result.estimates, result.lr
        e_index = [int(e_rows[g.prompt_row]) for g in batch.gens]
        u_index = [int(u_batch.rows[g.prompt_row]) for g in u_batch.gens]
        if self.detailed:
            self.jsonl("eta_sweep.jsonl", self._eta_records(est, lr, sweep))
            self.jsonl("e_sequences.jsonl", self._e_records(batch, sweep, e_index))
            self.jsonl("u_sequences.jsonl", self._u_records(u_batch, u_index))
        if self.tokens:
            self.jsonl("e_tokens.jsonl", self._e_token_records(batch))
            self.jsonl("u_tokens.jsonl", self._u_token_records(u_batch))
        if self.sequences:
            texts = [
                {"batch": "e", "index": i, "dataset_index": d, "sample_index": g.sample_index}
                | _texts(problems, tok, d, g.token_ids)
                for i, (g, d) in enumerate(zip(batch.gens, e_index, strict=True))
            ]
            texts += [
                {"batch": "u", "index": i, "dataset_index": d, "sample_index": g.sample_index}
                | _texts(problems, tok, d, g.token_ids)
                for i, (g, d) in enumerate(zip(u_batch.gens, u_index, strict=True))
            ]
            self.jsonl("texts.jsonl", texts)
        if self.tensors:
            self.npz(
                "bootstrap.npz",
                {
                    **{f"slope_{k}": v for k, v in slopes.items()},
                    "covariance_per_unit": cov_per_unit,
                    "e_prompt_rows": batch.prompt_rows,
                    **{f"sweep_{k}": v for k, v in sweep.items()},
                },
            )
        self.finish()

    @staticmethod
    def _eta_records(est, lr, sweep):
        from entroflow.checkpoint.delta_h_result import INTERVAL_NAMES

        for i, eta in enumerate(est.eta):
            yield {
                "eta": eta,
                "eta_scale": eta / lr,
                "first_draws": sweep["log_ratio"].shape[1],
                **{k: interval_record(getattr(est, k), i) for k in INTERVAL_NAMES},
                "relative_error": est.relative_error[i],
                "relative_error_ci": est.relative_error_ci[i],
                "verdict": str(est.verdict[i]),
                **{
                    k: getattr(est, k)[i]
                    for k in ("ess", "ess_minus", "clip_fraction", "clip_fraction_minus")
                },
            }

    @staticmethod
    def _e_records(batch, sweep, e_index):
        c, n_first = batch.columns, sweep["log_ratio"].shape[1]
        sums = {k: _sums(v) for k, v in c.items()}
        for i, g in enumerate(batch.gens):
            record = {
                "index": i,
                "dataset_index": e_index[i],
                "sample_index": g.sample_index,
                "length": len(g.token_ids),
                "finish_reason": g.finish_reason,
                "entropy_sum": sums["entropy"][i],
                "logprob_sum": sums["logprob"][i],
                "d_entropy_sum": sums["d_entropy"][i],
                "d_logprob_sum": sums["d_logprob"][i],
                "d_entropy_sum_gradient_part": sums["d_entropy_g"][i],
                "d_logprob_sum_gradient_part": sums["d_logprob_g"][i],
            }
            if i < n_first:  # the sweep's draws: the functional and log-ratio at θ ± ηv
                record.update({k: sweep[k][:, i] for k in sweep})
            yield record

    def _u_records(self, u_batch, u_index):
        kept = np.flatnonzero(u_batch.kept)
        jvp = {int(i): j for j, i in enumerate(kept)}
        s = self.u_scores
        for i, g in enumerate(u_batch.gens):
            record = {
                "index": i,
                "dataset_index": u_index[i],
                "sample_index": g.sample_index,
                "length": len(g.token_ids),
                "finish_reason": g.finish_reason,
                "correct": u_batch.correct[i],
                "reward": u_batch.rewards[i],
                "advantage": u_batch.advantages[i],
                "kept": bool(u_batch.kept[i]),
            }
            if s is not None and i in jvp:
                j = jvp[i]
                record.update(
                    entropy_sum=float(np.sum(s.entropy[j])),
                    logprob_sum=float(np.sum(s.logprob[j])),
                    d_entropy_sum=float(np.sum(s.d_entropy[j])),
                    d_logprob_sum=float(np.sum(s.d_logprob[j])),
                )
            yield record

    def _e_token_records(self, batch):
        c = batch.columns
        for i, g in enumerate(batch.gens):
            record = {"index": i, "token_id": g.token_ids}
            record.update({k: c[k][i] for k in ("entropy", "logprob", "d_entropy", "d_logprob")})
            record["d_entropy_gradient_part"] = c["d_entropy_g"][i]
            record["d_logprob_gradient_part"] = c["d_logprob_g"][i]
            for suffix, after in self.tokens_at_lr.items():
                if i < len(after):
                    record["entropy_at_lr" + suffix] = after[i]
            yield record

    def _u_token_records(self, u_batch):
        s = self.u_scores
        for j, i in enumerate(np.flatnonzero(u_batch.kept)):
            record = {"index": int(i), "token_id": u_batch.gens[i].token_ids}
            if s is not None:
                record.update(
                    entropy=s.entropy[j],
                    logprob=s.logprob[j],
                    d_entropy=s.d_entropy[j],
                    d_logprob=s.d_logprob[j],
                )
            yield record


def _texts(problems, tokenizer, row: int, token_ids) -> dict:
    return {
        "prompt": str(problems["prompt"].iloc[row]),
        "response": tokenizer.decode(np.asarray(token_ids).tolist(), skip_special_tokens=False),
    }


class FisherLog(StageLog):
    """The Fisher stage's records (files in README, "Detailed logs of a checkpoint stage")."""

    def __init__(self, folder=None, settings: LoggingSettings | None = None):
        super().__init__(folder, settings)
        self.blocks: list[np.ndarray] = []
        self.block_starts: list[int] = []

    def kernel_block(self, start: int, block: np.ndarray) -> None:
        """One column block's share of K (log_raw_tensors only)."""
        if self.tensors:
            self.block_starts.append(start)
            self.blocks.append(block.copy())

    def result(self, result, seqs, sqrt_p, sketches, norms, coefficients, tables, tokenizer):
        """Per-sequence records and checks (detailed), tokens, texts and the raw tensors."""
        e_batch, u_batch = tables
        if self.detailed:
            self.json("checks.json", _fisher_checks(result))
            self.jsonl("sequences.jsonl", _fisher_sequences(result, seqs, norms, coefficients))
        if self.tokens:
            self.jsonl(
                "tokens.jsonl",
                [
                    {"batch": kind, "row": int(r)}
                    | {k: table.response_tokens(int(r), k) for k in table.groups["tokens"]}
                    for kind, table, rows in (
                        ("e", e_batch, seqs.e_rows),
                        ("u", u_batch, seqs.u_rows),
                    )
                    for r in rows
                ],
            )
        if self.sequences:
            self.jsonl(
                "texts.jsonl",
                [
                    {
                        "batch": kind,
                        "row": int(r),
                        "prompt": tokenizer.decode(p),
                        "response": tokenizer.decode(y),
                    }
                    for kind, rows, prompts, responses in (
                        ("e", seqs.e_rows, seqs.e_prompts, seqs.e_responses),
                        ("u", seqs.u_rows, seqs.u_prompts, seqs.u_responses),
                    )
                    for r, p, y in zip(rows, prompts, responses, strict=True)
                ],
            )
        if self.tensors:
            arrays = {
                "K": result.K,
                "K_sketch": result.K_sketch,
                "sketch_e": sketches[0],
                "sketch_u": sketches[1],
                "gradient_norm_e": norms[0],
                "gradient_norm_u": norms[1],
                "block_start": np.asarray(self.block_starts, dtype=np.int64),
            }
            if self.blocks:
                arrays["blocks"] = np.stack(self.blocks)
            stats = parameter_stats(sqrt_p)
            arrays.update({f"sqrt_p_{k}": v for k, v in stats.items()})
            self.npz("kernel.npz", arrays)
        self.finish()


def _fisher_checks(result) -> dict:
    k = result.K
    return {
        "identity_from_kernel": result.identity_from_kernel,
        "identity_from_delta_h": result.identity_from_delta_h,
        "identity_relative_error": result.identity_relative_error,
        "sketch_kind": result.sketch_kind,
        "sketch_dim": result.sketch_dim,
        "sketch_relative_error": result.sketch_relative_error,
        "sketch_cosine_error_rms": result.sketch_cosine_error_rms,
        "parameters": result.parameters,
        "shape": list(k.shape),
        "K_min": k.min(),
        "K_max": k.max(),
        "K_mean": k.mean(),
        "K_frobenius": np.linalg.norm(k),
        "singular_values_top": result.singular_values[:16],
        "gradient_seconds": result.gradient_seconds,
        "kernel_seconds": result.kernel_seconds,
    }


def _fisher_sequences(result, seqs, norms, coefficients):
    k = result.K
    for i, r in enumerate(seqs.e_rows):
        yield {
            "batch": "e",
            "row": int(r),
            "dataset_index": result.e_dataset_index[i],
            "length": result.e_length[i],
            "logprob_sum": result.e_logprob_sum[i],
            "gradient_norm": norms[0][i],
            "kernel_row_sum": k[i].sum(),
        }
    for j, r in enumerate(seqs.u_rows):
        yield {
            "batch": "u",
            "row": int(r),
            "dataset_index": result.u_dataset_index[j],
            "length": result.u_length[j],
            "reward": result.u_reward[j],
            "advantage": result.u_advantage[j],
            "loss_coefficient": coefficients[j],
            "gradient_norm": norms[1][j],
            "kernel_column_sum": k[:, j].sum(),
            "contribution": result.u_contribution[j],
        }
