"""Rule plot_entropy_by_position."""

from entroflow.analysis import pick_trajectories
from entroflow.io import load_checked, read_json
from entroflow.logs import setup_logging
from entroflow.plots import entropy_by_position

setup_logging(snakemake.log[0])
stats = read_json(snakemake.input.stats)
table = load_checked(snakemake.input.entropy)
responses = pick_trajectories(table, snakemake.params.trajectories)
entropy_by_position(table, responses, stats, snakemake.output[0])
