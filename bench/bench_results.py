"""What every CPU benchmark writes beside its figures: the machine, and the JSON file itself."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    """The machine the figures come from (and how busy it was when they were taken)."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),  # other jobs on the machine
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(path: str | Path, result: dict, indent: int = 1) -> Path:
    """bench/results/<name>.json (folders made as needed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")
    return out
