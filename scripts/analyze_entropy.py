"""Rule analyze_entropy: Section 3 statistics -> stats.json and top_tokens.csv."""

import json

from entroflow.io import load_checked
from entroflow.logs import setup_logging
from entroflow.tokens.analysis import AnalysisSettings, entropy_stats, top_tokens

log = setup_logging(snakemake.log[0])
table = load_checked(snakemake.input[0])
a = snakemake.params.analysis
settings = AnalysisSettings(
    forking_percentile=a["forking_percentile"],
    low_entropy_percentile=a["low_entropy_percentile"],
    top_tokens=a["top_tokens"],
    min_token_count=a["min_token_count"],
)
stats = entropy_stats(table, settings)
with open(snakemake.output.stats, "w") as f:
    json.dump(stats, f, indent=2)
top_tokens(table, stats, settings).to_csv(snakemake.output.top_tokens, index=False)
log.info(
    "%d tokens: %.1f%% below 0.01 nats, P%g = %.4f nats (paper, Qwen3-8B: >50%%, P80 = 0.672)",
    stats["n_tokens"],
    100 * stats["fraction_below"]["0.01"],
    stats["forking_percentile"],
    stats["forking_threshold"],
)
