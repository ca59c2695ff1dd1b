"""Rule summarize_evaluation: one CSV and markdown table across checkpoints."""

import pandas as pd

from entroflow.eval.evaluation import markdown_table
from entroflow.io import read_json
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
rows = [read_json(path) for path in snakemake.input]
table = pd.DataFrame(rows).sort_values("step").drop(columns=["checkpoint"])
table.to_csv(snakemake.output.csv, index=False)
with open(snakemake.output.markdown, "w") as f:
    f.write(markdown_table(table))
log.info("\n%s", markdown_table(table))
