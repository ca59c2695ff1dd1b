"""Rule render_token_view: self-contained HTML of responses coloured by token entropy."""

from entroflow.io import load_checked, read_json
from entroflow.logs import setup_logging
from entroflow.report.plots import token_view_html
from entroflow.tokens.analysis import pick_trajectories

setup_logging(snakemake.log[0])
stats = read_json(snakemake.input.stats)
table = load_checked(snakemake.input.entropy)
token_view_html(
    table, pick_trajectories(table, snakemake.params.responses), stats, snakemake.output[0]
)
