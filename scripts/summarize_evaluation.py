"""Rule summarize_evaluation: the run's table across datasets (per metric, checkpoints x datasets,
mean ± standard error over seeds) as CSV and Markdown, and as plain text in the log."""

from entroflow.eval import table
from entroflow.io import read_json
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
results = [read_json(path) for path in snakemake.input]
frame = table.long(results, snakemake.params.datasets, snakemake.params.steps)
table.write(frame, snakemake.output.csv, snakemake.output.markdown)
log.info("\n%s", table.text(frame))
