# Small summaries run on the controller (a login node on a cluster), not as jobs.
localrules:
    summarize_experiment,


rule analyze_entropy:
    input:
        "results/{experiment}/entropy.h5",
    output:
        stats="results/{experiment}/stats.json",
        top_tokens=report(
            "results/{experiment}/top_tokens.csv",
            caption="../report/top_tokens.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "top tokens (table)"},
        ),
    log:
        "logs/analyze_entropy/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("analyze_entropy"),
        analysis=config["analysis"],
    script:
        "../../scripts/analyze_entropy.py"


rule plot_entropy_histogram:
    input:
        entropy="results/{experiment}/entropy.h5",
        stats="results/{experiment}/stats.json",
    output:
        report(
            "results/{experiment}/figures/entropy_histogram.png",
            caption="../report/entropy_histogram.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "histogram"},
        ),
    log:
        "logs/plot_entropy_histogram/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("plot_entropy_histogram"),
    script:
        "../../scripts/plot_entropy_histogram.py"


rule plot_word_clouds:
    input:
        top_tokens="results/{experiment}/top_tokens.csv",
    output:
        high=report(
            "results/{experiment}/figures/wordcloud_high.png",
            caption="../report/wordcloud.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "word cloud (high)"},
        ),
        low=report(
            "results/{experiment}/figures/wordcloud_low.png",
            caption="../report/wordcloud.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "word cloud (low)"},
        ),
    log:
        "logs/plot_word_clouds/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("plot_word_clouds"),
    script:
        "../../scripts/plot_word_clouds.py"


rule plot_entropy_by_position:
    input:
        entropy="results/{experiment}/entropy.h5",
        stats="results/{experiment}/stats.json",
    output:
        report(
            "results/{experiment}/figures/entropy_by_position.png",
            caption="../report/entropy_by_position.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "by position"},
        ),
    log:
        "logs/plot_entropy_by_position/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("plot_entropy_by_position"),
        trajectories=config["analysis"]["trajectories"],
    script:
        "../../scripts/plot_entropy_by_position.py"


rule render_token_view:
    input:
        entropy="results/{experiment}/entropy.h5",
        stats="results/{experiment}/stats.json",
    output:
        report(
            "results/{experiment}/figures/token_view.html",
            caption="../report/token_view.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "token view"},
        ),
    log:
        "logs/render_token_view/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("render_token_view"),
        responses=config["analysis"]["token_view_responses"],
    script:
        "../../scripts/render_token_view.py"


rule summarize_experiment:
    input:
        unpack(get_summary_inputs),
    output:
        markdown=report(
            "results/{experiment}/summary.md",
            caption="../report/summary.rst",
            category="Token entropy",
            labels={"experiment": "{experiment}", "figure": "summary"},
        ),
        json="results/{experiment}/summary.json",
    log:
        "logs/summarize_experiment/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("summarize_experiment"),
        runs=get_summary_runs,
        reward_steps=10,
    script:
        "../../scripts/summarize_experiment.py"
