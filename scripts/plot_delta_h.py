"""Rule plot_delta_h: log-log |ΔH| vs η, δH₁ vs ΔH_true, and both across checkpoints."""

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.logs import setup_logging
from entroflow.report.plots import delta_h_figures

setup_logging(snakemake.log[0])
results = [DeltaHResult.read(path, batches=False) for path in snakemake.input]
delta_h_figures(
    results, snakemake.output.loglog, snakemake.output.first_order, snakemake.output.checkpoints
)
