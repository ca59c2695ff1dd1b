"""Rule compute_fisher_kernel: per-sequence gradients (streamed to disk) -> K₁ and its checks."""

from pathlib import Path

import torch

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.detailed_log import log_folder
from entroflow.checkpoint.fisher_run import fisher_kernel_stage
from entroflow.checkpoint.settings import FisherSettings, RunShape, recorded_settings
from entroflow.lm.checkpoints import load_stage_policy
from entroflow.lm.models import load_tokenizer
from entroflow.lm.precision import apply_precision
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
checkpoint, cfg = snakemake.params.checkpoint, snakemake.params.settings
tokenizer = load_tokenizer(snakemake.input.model)
settings, model_entry = FisherSettings(**cfg["fisher"]), snakemake.params.model
delta_h = DeltaHResult.read(snakemake.input.delta_h)  # its batches and its replayed update
store = Path(snakemake.params.gradients)
with apply_precision(settings.precision, f"runs.{snakemake.wildcards.run}.fisher.precision") as p:
    # float64 by default (fisher.precision.dtype)
    model = load_stage_policy(snakemake.input.model, checkpoint, model_entry, p)
    try:
        result = fisher_kernel_stage(
            model,
            tokenizer,
            delta_h,
            RunShape(**cfg["run"]),
            settings,
            store,
            log_folder(snakemake.log[0]),  # detailed logs: logs/compute_fisher_kernel/{run}.{step}/
        )
    finally:
        if store.suffix == ".tmp":
            store.unlink(missing_ok=True)  # temporary by default (keep_gradients: true keeps it)
result.checkpoint, result.step = checkpoint, int(snakemake.wildcards.step)
result.settings = recorded_settings(cfg)  # the same file at every logging level
result.write(snakemake.output[0])
log.info("identity relative error %.2e", result.identity_relative_error)
