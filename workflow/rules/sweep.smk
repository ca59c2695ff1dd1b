# Small summaries and figures run on the controller (a login node on a cluster), not as jobs.
localrules:
    summarize_temperature_sweep,


rule evaluate_temperature_cell:
    input:
        problems=get_sweep_problems,
        model=get_sweep_model_dir,
        stats=get_sweep_stats,
    output:
        "results/sweeps/{sweep}/cells/th{t_high}_tl{t_low}.json",
    log:
        "logs/evaluate_temperature_cell/{sweep}.th{t_high}_tl{t_low}.log",
    benchmark:
        "benchmarks/evaluate_temperature_cell/{sweep}.th{t_high}_tl{t_low}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=240,
    params:
        library=library("evaluate_temperature_cell"),
        sweep=get_sweep,
        model=get_sweep_model_settings,
        base_temperature=get_sweep_base_temperature,
        progress="results/sweeps/{sweep}/cells/th{t_high}_tl{t_low}.progress.jsonl",
    script:
        "../../scripts/evaluate_temperature_cell.py"


rule summarize_temperature_sweep:
    input:
        get_sweep_cells,
    output:
        csv=report(
            "results/sweeps/{sweep}/table.csv",
            caption="../report/temperature_sweep.rst",
            category="Forking-token temperature",
            labels={
                "sweep": "{sweep}",
                "figure": "accuracy per (T_high, T_low) (table)",
            },
        ),
        markdown="results/sweeps/{sweep}/table.md",
        heatmap=report(
            "results/sweeps/{sweep}/heatmap.png",
            caption="../report/temperature_sweep.rst",
            category="Forking-token temperature",
            labels={"sweep": "{sweep}", "figure": "accuracy per (T_high, T_low)"},
        ),
    log:
        "logs/summarize_temperature_sweep/{sweep}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("summarize_temperature_sweep"),
    script:
        "../../scripts/summarize_temperature_sweep.py"
