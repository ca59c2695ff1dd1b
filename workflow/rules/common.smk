import json
from pathlib import Path

from entroflow.config import validate_config
from entroflow.datasets import resolve_entry

validate_config(config)

FIGURES = [
    "entropy_histogram.png",
    "wordcloud_high.png",
    "wordcloud_low.png",
    "entropy_by_position.png",
    "token_view.html",
]

DEMO_MODEL_DIR = "resources/models/demo"


def get_final_output():
    outputs = []
    for name in config["experiments"]:
        outputs += [
            f"results/{name}/entropy.h5",
            f"results/{name}/stats.json",
            f"results/{name}/top_tokens.csv",
        ]
        outputs += [f"results/{name}/figures/{fig}" for fig in FIGURES]
    return outputs


def model_dir(name):
    """Where the model's from_pretrained folder is: built, downloaded once, or the user's own."""
    entry = config["models"][name]
    if entry["source"] == "demo":
        return DEMO_MODEL_DIR
    if entry["source"] == "hub":
        return f"resources/models/hub/{name}"
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


def get_model_settings(wildcards):
    """Only the model settings the jobs use, since params are a rerun trigger."""
    exp = get_experiment(wildcards)
    entry = config["models"][exp["model"]]
    return {
        "name": exp["model"],
        "path": entry.get("path", DEMO_MODEL_DIR),
        "revision": entry["revision"],
        "dtype": entry["dtype"],
        "system_prompt": entry["system_prompt"],
        "chat_template_kwargs": entry["chat_template_kwargs"],
    }


def get_generation_settings(wildcards):
    exp = get_experiment(wildcards)
    return {
        "dataset": exp["dataset"],
        "engine": exp["engine"],
        "batch_size": exp["batch_size"],
        "sampling": exp["sampling"],
    }


def get_scored_shards(wildcards):
    n = get_experiment(wildcards)["shards"]
    return [
        f"results/{wildcards.experiment}/shards/scored.{i}-of-{n}.h5" for i in range(n)
    ]


def get_temperature(wildcards):
    return get_experiment(wildcards)["sampling"]["temperature"]
