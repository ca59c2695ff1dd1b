"""Rule plot_entropy_by_position."""

from entroflow.io import load_checked, read_json
from entroflow.logs import setup_logging
from entroflow.report.plots import entropy_by_position
from entroflow.tokens.analysis import pick_trajectories

setup_logging(snakemake.log[0])
stats = read_json(snakemake.input.stats)
table = load_checked(snakemake.input.entropy)
responses = pick_trajectories(table, snakemake.params.trajectories)
entropy_by_position(table, responses, stats, snakemake.output[0])
