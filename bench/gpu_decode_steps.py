"""Where a static-decoder step's time goes (GPU): graph replay vs sampling, by batch and window.

    python bench/gpu_decode_steps.py [--shape 0.5B] [--length 4224]

For batch sizes 256 / 128 / 32 and attention windows of 256 and the whole cache: milliseconds of
one captured decode step (graph replay) with and without torch.compile, and of the samplers
(torch: log_softmax, exact draw, log-prob; fused: the one-read Triton kernel), with and without
inline entropy.
"""

from __future__ import annotations

import argparse
import time

import torch
from gpu_common import cuda_seconds, random_qwen
from transformers import LogitsProcessorList

from entroflow.engines.static_decode import ALIGN, GROUPED_ATTENTION, StaticDecoder, make_sampler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.5B")
    parser.add_argument("--length", type=int, default=4224)
    args = parser.parse_args()
    model = random_qwen(args.shape)
    decoders = {
        "compiled": StaticDecoder(model, [151_645], 151_643, compile=True),
        "not compiled": StaticDecoder(model, [151_645], 151_643, compile=False),
    }
    model.config._attn_implementation = GROUPED_ATTENTION
    generator = torch.Generator(device="cuda").manual_seed(0)
    samplers = {
        f"{kind} sampler{' + entropy' if entropy else ''}": make_sampler(
            LogitsProcessorList(), 1.0 if entropy else None, generator, fused=kind == "fused"
        )
        for kind in ("torch", "fused")
        for entropy in (False, True)
    }
    print(torch.cuda.get_device_name(), f"Qwen2.5-{args.shape} shape, cache length {args.length}")
    with torch.inference_mode():
        for size in (256, 128, 32):
            prompts = torch.randint(0, 151_000, (size, 128)).tolist()
            for name, decoder in decoders.items():
                batch, logits = decoder._prefill(prompts, args.length, spare_row=size)
                for column in (200, args.length - 2 * ALIGN):  # the last: the widest window
                    batch.column.fill_(column)
                    start = time.perf_counter()
                    decoder._step(batch, column)  # captures (and compiles, the first times)
                    setup = time.perf_counter() - start
                    replay = cuda_seconds(lambda b=batch: b.graph.replay(), repeat=50)
                    print(f"  batch {size:3d}, window {batch.visible:4d}, {name}: graph replay "
                          f"{replay * 1e3:.2f} ms (capture {setup:.1f} s)")  # fmt: skip
                del batch
                torch.cuda.empty_cache()
            timings = {
                name: cuda_seconds(lambda lg=logits, s=sampler: s(lg), repeat=50)
                for name, sampler in samplers.items()
            }
            print(
                f"  batch {size:3d}: "
                + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timings.items())
            )


if __name__ == "__main__":
    main()
