"""Logging for rule scripts and the CLI: to a log file and stderr, with progress lines."""

from __future__ import annotations

import logging
import sys
import time
import warnings

from entroflow.errors import EntroflowError


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> logging.Logger:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    warnings.filterwarnings("once")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (the qlora extra), imported by PEFT in every process, warns on CPU that its
    # optional hub kernel package is absent; its own CPU path is what QLoRA uses here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)
    sys.excepthook = report_uncaught
    return logging.getLogger("entroflow")


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return "from kernels-community" not in record.getMessage()


def report_uncaught(exc_type, exc, tb) -> None:
    """Bad input (an EntroflowError) becomes one readable line; anything else keeps its traceback."""
    log = logging.getLogger("entroflow")
    if issubclass(exc_type, EntroflowError):
        log.error("%s", exc)
    else:
        log.error("unexpected error", exc_info=(exc_type, exc, tb))


class ProgressLog:
    """Callback `(done, total, seconds)` that logs progress and throughput, at most every `every` s."""

    def __init__(self, what: str, unit: str, logger: logging.Logger, every: float = 10.0):
        self.what, self.unit, self.log, self.every = what, unit, logger, every
        self._last = -float("inf")

    def __call__(self, done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        rate = done / seconds if seconds > 0 else float("nan")
        eta = (total - done) / rate if rate and rate == rate and rate > 0 else float("nan")
        self.log.info(
            "%s: %d/%d %s (%.0f%%), %.1f %s/s, %.0f s elapsed, ~%.0f s left",
            self.what,
            done,
            total,
            self.unit,
            100 * done / max(total, 1),
            rate,
            self.unit,
            seconds,
            eta,
        )
