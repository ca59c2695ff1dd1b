"""Rule summarize_experiment: the experiment's headline numbers -> summary.md and summary.json."""

import json
from pathlib import Path

import pandas as pd

from entroflow.io import read_json
from entroflow.logs import setup_logging
from entroflow.report.summary import RunFiles, summarize, write

log = setup_logging(snakemake.log[0])
model_report = None
if hasattr(snakemake.input, "model"):  # a demo model: its training report has the accuracy
    model_report = read_json(Path(snakemake.input.model) / "training_report.json")
runs = [
    RunFiles(
        name=name,
        manifest=Path(files["trace"]).parent / "manifest.jsonl" if files["trace"] else None,
        eval_table=files["eval_table"],
        delta_h={int(step): Path(p) for step, p in files["delta_h"].items()},
        fisher={int(step): Path(p) for step, p in files["fisher"].items()},
    )
    for name, files in snakemake.params.runs.items()
]
summary = summarize(
    snakemake.wildcards.experiment,
    read_json(snakemake.input.stats),
    pd.read_csv(snakemake.input.top_tokens, keep_default_na=False),
    model_report,
    runs,
    snakemake.params.reward_steps,
)
write(summary, snakemake.output.json, snakemake.output.markdown)
log.info("%s", json.dumps(summary))
