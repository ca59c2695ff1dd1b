"""Rule plot_entropy_histogram."""

from entroflow.io import read_json, read_token_file
from entroflow.logs import setup_logging
from entroflow.report.plots import entropy_histogram

setup_logging(snakemake.log[0])
stats = read_json(snakemake.input.stats)
table = read_token_file(snakemake.input.entropy, groups=["tokens"])
entropy_histogram(table["tokens/entropy"], stats, snakemake.output[0])
