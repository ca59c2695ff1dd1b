"""Durable progress for long jobs: completed batches saved one file each, skipped on a rerun.

A generation or scoring job on a cluster can be preempted or killed (SIGKILL, node failure) at
any point. Each finished batch is written atomically (temporary file, fsync, rename) into a
folder beside the job's output; a rerun of the same job loads the saved batches instead of
recomputing them and continues with the first missing one. Batches are keyed by their index in
a deterministic batch plan and every batch seeds its own randomness, so the resumed result is
the uninterrupted one. The folder carries a fingerprint of the job's inputs and settings: saved
batches from different settings are discarded, never mixed in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def fingerprint(*parts) -> str:
    """sha256 over JSON-able settings and numpy arrays (by dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def folder_fingerprint(folder: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of every file under a model folder: a changed model restarts a job."""
    root = Path(folder)
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BatchJournal:
    """Saved batches of one job in `folder`, valid for one `key` (a fingerprint string)."""

    META = "journal.json"

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder)
        self.key = key
        meta = self.folder / self.META
        if self.folder.exists() and self._saved_key(meta) != key:
            log.warning(
                "discarding %d saved batches in %s: they were made from other inputs or settings",
                len(self._batch_files()),
                self.folder,
            )
            shutil.rmtree(self.folder)
        self.resumed = len(self._batch_files())
        if self.resumed:
            log.info("resuming: %d batches already saved in %s", self.resumed, self.folder)

    @staticmethod
    def _saved_key(meta: Path) -> str | None:
        try:
            return json.loads(meta.read_text()).get("key")
        except (OSError, ValueError, AttributeError):  # missing or damaged: start over
            return None

    def _batch_files(self) -> list[Path]:
        return sorted(self.folder.glob("batch-*.npz"))

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.npz"

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_path(self.folder)  # the rename itself survives a crash
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        path = self._path(index)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                return {name: saved[name] for name in saved.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            # A batch damaged outside our atomic writes (disk, copy, hand edit): redo it.
            log.warning("saved batch %s is unreadable (%s): recomputing it", path, err)
            path.unlink(missing_ok=True)
            return None

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Save one finished batch (the folder appears with the first one)."""
        if not (self.folder / self.META).exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_atomic(self.folder / self.META, json.dumps({"key": self.key}).encode())
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._write_atomic(self._path(index), buffer.getvalue())

    def remove(self) -> None:
        """Drop the folder once the job's real output is written."""
        shutil.rmtree(self.folder, ignore_errors=True)


def load_or_compute(
    journal: BatchJournal | None, index: int, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Batch `index` from the journal, or `compute()` it and save it there (no journal: compute)."""
    saved = journal.load(index) if journal is not None else None
    if saved is None:
        saved = compute()
        if journal is not None:
            journal.save(index, saved)
    return saved


def journal_folder(output: str | os.PathLike) -> Path:
    """Where the saved batches of the job writing `output` live: `<output>.partial/`."""
    output = Path(output)
    return output.with_name(output.name + ".partial")
