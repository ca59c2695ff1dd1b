# Small summaries and figures run on the controller (a login node on a cluster), not as jobs.
localrules:
    plot_delta_h,


rule estimate_delta_h:
    input:
        checkpoint=get_optimizer_checkpoint_input,
        problems=get_delta_h_problems,
        model=get_run_model_dir,
    output:
        "results/runs/{run}/delta_h/checkpoint-{step}.h5",
    # runs.<run>.delta_h.logging also writes detailed logs into logs/estimate_delta_h/{run}.{step}/
    # (a side artifact beside the log, kept across reruns and rotated by max_files; README).
    log:
        "logs/estimate_delta_h/{run}.{step}.log",
    benchmark:
        "benchmarks/estimate_delta_h/{run}.{step}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=240,
    params:
        library=library("estimate_delta_h"),
        checkpoint=get_checkpoint,
        settings=get_delta_h_settings,
        model=get_run_model_settings,
    script:
        "../../scripts/estimate_delta_h.py"


rule plot_delta_h:
    input:
        get_delta_h_results,
    output:
        loglog=report(
            "results/runs/{run}/figures/delta_h_loglog.png",
            caption="../report/delta_h.rst",
            category="Entropy change per update",
            labels={"run": "{run}", "figure": "|ΔH| against η"},
        ),
        first_order=report(
            "results/runs/{run}/figures/delta_h_first_order.png",
            caption="../report/delta_h.rst",
            category="Entropy change per update",
            labels={"run": "{run}", "figure": "δH₁ against ΔH"},
        ),
        checkpoints=report(
            "results/runs/{run}/figures/delta_h_checkpoints.png",
            caption="../report/delta_h.rst",
            category="Entropy change per update",
            labels={"run": "{run}", "figure": "across checkpoints"},
        ),
    log:
        "logs/plot_delta_h/{run}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("plot_delta_h"),
    script:
        "../../scripts/plot_delta_h.py"
