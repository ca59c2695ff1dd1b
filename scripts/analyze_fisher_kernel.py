"""Rule analyze_fisher_kernel: figures of K₁ across checkpoints."""

from entroflow.io import read_token_file
from entroflow.logs import setup_logging
from entroflow.report.plots import fisher_figure

setup_logging(snakemake.log[0])
fisher_figure([read_token_file(path, groups=[""]) for path in snakemake.input], snakemake.output[0])
