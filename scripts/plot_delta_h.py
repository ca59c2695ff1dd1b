"""Rule plot_delta_h: log-log |ΔH| vs η, δH₁ vs ΔH_true, and both across checkpoints."""

from entroflow.io import read_token_file
from entroflow.logs import setup_logging
from entroflow.report.plots import delta_h_figures

setup_logging(snakemake.log[0])
files = [read_token_file(path, groups=[""]) for path in snakemake.input]
delta_h_figures(
    files, snakemake.output.loglog, snakemake.output.first_order, snakemake.output.checkpoints
)
