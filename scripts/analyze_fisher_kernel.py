"""Rule analyze_fisher_kernel: figures of K₁ across checkpoints."""

from entroflow.checkpoint.fisher_run import FisherResult
from entroflow.logs import setup_logging
from entroflow.report.plots import fisher_figure

setup_logging(snakemake.log[0])
fisher_figure([FisherResult.read(path) for path in snakemake.input], snakemake.output[0])
