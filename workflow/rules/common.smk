import dataclasses
import json
import os
import re
from pathlib import Path

from entroflow.checkpoint.settings import stage_params
from entroflow.code_version import library_fingerprint
from entroflow.config import validate_config
from entroflow.data.datasets import resolve_entry
from entroflow.eval.settings import EvalSettings
from entroflow.eval.sweep import cell_name, sweep_cells
from entroflow.lm.checkpoints import (
    CheckpointError,
    find_checkpoints,
    require_optimizer_state,
)
from entroflow.lm.models import gguf_file
from entroflow.provenance import check_config_outputs
from entroflow.training.settings import RunSettings

validate_config(config)


def config_files():
    """The config file(s) of this run, as paths relative to the working directory."""
    given = workflow.config_settings.configfiles
    files = given or [Path(workflow.basedir).parent / "config/config.yaml"]
    return [os.path.relpath(Path(f).resolve()) for f in files]


# Rule scripts record which config made a shared intermediate (entroflow/provenance.py); the
# key is set after validation and read by scripts only, so it is no param (no rerun trigger).
config["_config_files"] = config_files()
check_config_outputs(config, config["_config_files"])

FIGURES = [
    "entropy_histogram.png",
    "wordcloud_high.png",
    "wordcloud_low.png",
    "entropy_by_position.png",
    "token_view.html",
]

DEMO_MODEL_DIR = "resources/models/demo"


def names_pattern(names):
    """A wildcard constraint matching exactly these entry names ('.' taken literally)."""
    return "|".join(re.escape(name) for name in names) or "NONE"


def library(script):
    """params.library: a hash of the code of the rule's script and the entroflow modules it
    imports, so that a code edit reruns the rules running it (entroflow/code_version.py).
    """
    return library_fingerprint(
        Path(workflow.basedir).parent / "scripts" / f"{script}.py"
    )


def get_final_output():
    outputs = []
    for name, experiment in config["experiments"].items():
        if not experiment["default_target"]:
            continue
        outputs += [
            f"results/{name}/entropy.h5",
            f"results/{name}/stats.json",
            f"results/{name}/top_tokens.csv",
        ]
        outputs += [f"results/{name}/figures/{fig}" for fig in FIGURES]
        outputs += [f"results/{name}/summary.md", f"results/{name}/summary.json"]
    for run in config["runs"]:
        outputs += run_outputs(run)
    for sweep in config["temperature_sweeps"]:
        outputs += [
            f"results/sweeps/{sweep}/table.csv",
            f"results/sweeps/{sweep}/heatmap.png",
        ]
    return outputs


def summary_runs(experiment):
    """run -> the outputs summarize_experiment reads, for the runs of the experiment's model:
    trace summary (the manifest lies beside it), eval table, ΔH files, Fisher kernels.
    """
    model = config["experiments"][experiment]["model"]
    runs = {}
    for run, entry in config["runs"].items():
        if entry["model"] != model:
            continue
        delta_h = delta_h_checkpoints(run) if entry["delta_h"]["enabled"] else {}
        fisher = delta_h if entry["fisher"]["enabled"] else {}
        runs[run] = {
            "trace": (
                None
                if entry["checkpoints"]
                else f"results/runs/{run}/trace/summary.json"
            ),
            "eval_table": (
                f"results/runs/{run}/eval/table.csv" if eval_datasets(run) else None
            ),
            "delta_h": {
                s: f"results/runs/{run}/delta_h/checkpoint-{s}.h5" for s in delta_h
            },
            "fisher": {
                s: f"results/runs/{run}/fisher/checkpoint-{s}/kernel.h5" for s in fisher
            },
        }
    return runs


def get_summary_runs(wildcards):
    return summary_runs(wildcards.experiment)


def get_summary_inputs(wildcards):
    """stats, top tokens, the demo model (its training report) and every summary_runs file."""
    inputs = {
        "stats": f"results/{wildcards.experiment}/stats.json",
        "top_tokens": f"results/{wildcards.experiment}/top_tokens.csv",
    }
    model = config["experiments"][wildcards.experiment]["model"]
    if config["models"][model]["source"] == "demo":
        inputs["model"] = DEMO_MODEL_DIR
    files = []
    for run in summary_runs(wildcards.experiment).values():
        files += [f for f in (run["trace"], run["eval_table"]) if f]
        files += list(run["delta_h"].values()) + list(run["fisher"].values())
    inputs["runs"] = files
    return inputs


def model_dir(name):
    """Where the model's from_pretrained folder is: built, downloaded once, or the user's own."""
    entry = config["models"][name]
    if entry["source"] == "demo":
        return DEMO_MODEL_DIR
    if entry["source"] == "hub":
        return f"resources/models/hub/{name}"
    if entry["source"] == "gguf":
        return f"resources/models/gguf/{name}"
    return entry["path"]


def get_experiment(wildcards):
    return config["experiments"][wildcards.experiment]


def get_model_dir(wildcards):
    return model_dir(get_experiment(wildcards)["model"])


def get_problems(wildcards):
    return f"resources/datasets/{get_experiment(wildcards)['dataset']}.parquet"


def get_dataset_entry(wildcards):
    return resolve_entry(wildcards.dataset, config["datasets"][wildcards.dataset])


def get_hub_model(wildcards):
    entry = config["models"][wildcards.model]
    return {"path": entry["path"], "revision": entry["revision"]}


def model_settings(name):
    """Only the model settings the jobs use, since params are a rerun trigger."""
    entry = config["models"][name]
    return {
        "name": name,
        "path": entry.get("path")
        or model_dir(name),  # hub id, folder, .gguf, or where it is built
        "revision": entry["revision"],
        "dtype": entry["dtype"],
        "system_prompt": entry["system_prompt"],
        "chat_template_kwargs": entry["chat_template_kwargs"],
    }


def get_model_settings(wildcards):
    return model_settings(get_experiment(wildcards)["model"])


def get_generation_settings(wildcards):
    exp = get_experiment(wildcards)
    settings = {
        "dataset": exp["dataset"],
        "engine": exp["engine"],
        "batch_size": exp["batch_size"],
        "sampling": exp["sampling"],
    }
    if (
        exp["engine"] == "sglang"
    ):  # only there, so hf experiments' params stay as they were
        settings["tensor_parallel_size"] = exp["tensor_parallel_size"]
    # hf decoder choices only where not the defaults, so existing experiments' params stay
    if exp["engine"] == "hf":
        if exp["decoder"] != "auto":
            settings["decoder"] = exp["decoder"]
        if not exp["compile"]:
            settings["compile"] = False
        if exp["refill_queue"]:
            settings["refill_queue"] = exp["refill_queue"]
    return settings


def get_generation_gpus(wildcards):
    exp = get_experiment(wildcards)
    return exp["tensor_parallel_size"] if exp["engine"] == "sglang" else 1


def get_scored_shards(wildcards):
    n = get_experiment(wildcards)["shards"]
    return [
        f"results/{wildcards.experiment}/shards/scored.{i}-of-{n}.h5" for i in range(n)
    ]


def get_temperature(wildcards):
    return get_experiment(wildcards)["sampling"]["temperature"]


def run_checkpoints(run):
    """step -> checkpoint folder: from the config for our runs, a glob for external ones."""
    entry = config["runs"][run]
    if entry["checkpoints"]:
        return find_checkpoints(entry["checkpoints"])
    steps = range(entry["save_every"], entry["steps"] + 1, entry["save_every"])
    return {s: f"results/runs/{run}/checkpoint-{s}" for s in steps}


def run_outputs(run):
    entry = config["runs"][run]
    outputs = []
    if not entry["checkpoints"]:
        outputs += [
            f"results/runs/{run}/run.json",
            f"results/runs/{run}/figures/training.png",
        ]
    if eval_datasets(run):
        outputs += [f"results/runs/{run}/eval/table.csv"]
    if entry["delta_h"]["enabled"] and delta_h_checkpoints(run):
        outputs += [f"results/runs/{run}/figures/delta_h_loglog.png"]
        if entry["fisher"]["enabled"]:
            outputs += [f"results/runs/{run}/figures/fisher_kernel.png"]
    return outputs


def delta_h_checkpoints(run):
    """Checkpoints ΔH can use: all of ours; an external run's only where optimizer state exists
    (the others are refused here, with a warning, and their other analyses still run).
    """
    found = run_checkpoints(run)
    if not config["runs"][run]["checkpoints"]:
        return found
    usable = {}
    for step, folder in found.items():
        try:
            require_optimizer_state(folder)
            usable[step] = folder
        except CheckpointError as err:
            logger.warning(f"ΔH skipped: {err}")
    return usable


def get_delta_h_problems(wildcards):
    entry = get_run(wildcards)
    return (
        f"resources/datasets/{entry['delta_h']['dataset'] or entry['dataset']}.parquet"
    )


def get_delta_h_settings(wildcards):
    return stage_params(get_run(wildcards), "delta_h")


def get_delta_h_results(wildcards):
    return [
        f"results/runs/{wildcards.run}/delta_h/checkpoint-{s}.h5"
        for s in delta_h_checkpoints(wildcards.run)
    ]


def get_run(wildcards):
    return config["runs"][wildcards.run]


def get_run_model_dir(wildcards):
    return model_dir(get_run(wildcards)["model"])


def get_run_problems(wildcards):
    return f"resources/datasets/{get_run(wildcards)['dataset']}.parquet"


def get_train_settings(wildcards):
    """Only the keys training uses (params are a rerun trigger: analysis settings stay out;
    so does report_to, read by the script from the config: trackers change no result).
    """
    keys = {f.name for f in dataclasses.fields(RunSettings)} - {"report_to"} | {"lora"}
    run = get_run(wildcards)
    # processes and deepspeed_config only where set, so one-process runs' params stay as they were
    launch = {"processes": 1, "deepspeed_config": None}
    return {
        k: v
        for k, v in run.items()
        if k in keys and not (k in launch and v == launch[k])
    }


def get_train_gpus(wildcards):
    """One GPU per training process (all on one node: the rule asks Slurm for nodes=1)."""
    return get_run(wildcards)["processes"]


def get_train_threads(wildcards):
    return 2 * get_run(wildcards)["processes"]


def get_run_model_settings(wildcards):
    """The run's model entry's dtype and system prompt, and its QLoRA base's 4-bit type (only
    when set, so unquantized runs keep their params)."""
    run = get_run(wildcards)
    entry = config["models"][run["model"]]
    out = {"dtype": entry["dtype"], "system_prompt": entry["system_prompt"]}
    if run["lora"]["quantize"] is not None:
        out |= {k: run["lora"][k] for k in ("quantize", "double_quant")}
    return out


def get_checkpoint(wildcards):
    return run_checkpoints(wildcards.run)[int(wildcards.step)]


def get_optimizer_checkpoint_input(wildcards):
    """As get_checkpoint_input, for rules that need the optimizer state: refused up front."""
    if get_run(wildcards)["checkpoints"]:
        require_optimizer_state(get_checkpoint(wildcards))
    return get_checkpoint_input(wildcards)


def get_checkpoint_input(wildcards):
    """Our runs: the training marker (the folder appears as a side effect of training);
    external runs: the folder itself."""
    if get_run(wildcards)["checkpoints"]:
        return get_checkpoint(wildcards)
    return f"results/runs/{wildcards.run}/run.json"


def eval_datasets(run):
    return EvalSettings.from_entry(config["runs"][run]["eval"]).datasets


def get_eval_settings(wildcards):
    """The settings one (checkpoint, dataset) job reads: not the list of datasets, so that adding
    one reruns none of the others (params are a rerun trigger)."""
    return EvalSettings.from_entry(get_run(wildcards)["eval"]).job_params()


def get_eval_datasets(wildcards):
    return eval_datasets(wildcards.run)


def get_eval_steps(wildcards):
    return sorted(run_checkpoints(wildcards.run))


def get_eval_results(wildcards):
    """Every (dataset, checkpoint) result of the run: the cross-dataset table's inputs."""
    return [
        f"results/runs/{wildcards.run}/eval/{dataset}/checkpoint-{s}.json"
        for dataset in eval_datasets(wildcards.run)
        for s in run_checkpoints(wildcards.run)
    ]


def get_fisher_settings(wildcards):
    return stage_params(get_run(wildcards), "fisher")


def get_gradient_store(wildcards):
    path = (
        f"results/runs/{wildcards.run}/fisher/checkpoint-{wildcards.step}/gradients.h5"
    )
    return path if get_run(wildcards)["fisher"]["keep_gradients"] else f"{path}.tmp"


def get_fisher_results(wildcards):
    return [
        f"results/runs/{wildcards.run}/fisher/checkpoint-{s}/kernel.h5"
        for s in delta_h_checkpoints(wildcards.run)
    ]


def get_sweep(wildcards):
    return config["temperature_sweeps"][wildcards.sweep]


def get_sweep_experiment(wildcards):
    return config["experiments"][get_sweep(wildcards)["experiment"]]


def get_sweep_problems(wildcards):
    dataset = (
        get_sweep(wildcards)["dataset"] or get_sweep_experiment(wildcards)["dataset"]
    )
    return f"resources/datasets/{dataset}.parquet"


def get_sweep_model_dir(wildcards):
    return model_dir(get_sweep_experiment(wildcards)["model"])


def get_sweep_model_settings(wildcards):
    return model_settings(get_sweep_experiment(wildcards)["model"])


def get_sweep_base_temperature(wildcards):
    """The temperature the threshold's entropies are measured at: the experiment's."""
    return get_sweep_experiment(wildcards)["sampling"]["temperature"]


def get_sweep_stats(wildcards):
    """The experiment's stats.json (its forking threshold), unless the sweep sets a threshold."""
    sweep = get_sweep(wildcards)
    return (
        []
        if sweep["threshold"] is not None
        else f"results/{sweep['experiment']}/stats.json"
    )


def get_sweep_cells(wildcards):
    return [
        f"results/sweeps/{wildcards.sweep}/cells/{cell_name(h, lo)}.json"
        for h, lo in sweep_cells(get_sweep(wildcards))
    ]


def get_gguf_file(wildcards):
    return str(gguf_file(wildcards.model, config["models"][wildcards.model]))
