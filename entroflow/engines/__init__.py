"""Generation engines behind one interface: token ids in, sampled token ids (+ engine log-probs) out."""

from __future__ import annotations

from entroflow.engines.base import Engine, ForkingTemperature, Generation, SamplingParams

ENGINES = ("hf", "sglang")


def get_engine(name: str, **kwargs) -> Engine:
    """Engines are imported only when chosen (sglang is an optional extra)."""
    if name == "hf":
        from entroflow.engines.hf import HFEngine

        return HFEngine(**kwargs)
    if name == "sglang":
        from entroflow.engines.sglang import SGLangEngine

        return SGLangEngine(**kwargs)
    raise ValueError(f"unknown engine '{name}'; available: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "ForkingTemperature", "Generation", "SamplingParams", "get_engine"]
