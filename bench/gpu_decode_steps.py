"""Where a static-decoder step's time goes (GPU): graph replay vs sampling, by batch and window.

    python bench/gpu_decode_steps.py [--shape 0.5B] [--length 4224]

For batch sizes 256 / 128 / 32 and attention windows of 256 and the whole cache: milliseconds of
one captured decode step (replay), of the sampler (log_softmax, exact draw, log-prob) with and
without inline entropy, and of one whole loop iteration as `decode` runs it.
"""

from __future__ import annotations

import argparse

import torch
from gpu_common import cuda_seconds, random_qwen
from transformers import LogitsProcessorList

from entroflow.engines.static_decode import GROUPED_ATTENTION, StaticDecoder, make_sampler


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.5B")
    parser.add_argument("--length", type=int, default=4224)
    args = parser.parse_args()
    model = random_qwen(args.shape)
    decoder = StaticDecoder(model, [151_645], 151_643)
    model.config._attn_implementation = GROUPED_ATTENTION
    generator = torch.Generator(device="cuda").manual_seed(0)
    plain = make_sampler(LogitsProcessorList(), None, generator)
    with_entropy = make_sampler(LogitsProcessorList(), 1.0, generator)
    print(torch.cuda.get_device_name(), f"Qwen2.5-{args.shape} shape, cache length {args.length}")
    with torch.inference_mode():
        for size in (256, 128, 32):
            prompts = torch.randint(0, 151_000, (size, 128)).tolist()
            batch, logits = decoder._prefill(prompts, args.length, spare_row=size)
            for column in (200, args.length - 1):
                batch.column.fill_(column)
                decoder._step(batch, column)  # captures
                replay = cuda_seconds(lambda b=batch: b.graph.replay(), repeat=50)
                eager = cuda_seconds(lambda b=batch: decoder._forward(b), repeat=10)
                print(f"  batch {size:3d}, window {batch.visible:4d}: graph replay {replay * 1e3:.2f} ms, "
                      f"eager forward {eager * 1e3:.2f} ms")  # fmt: skip
            sample_s = cuda_seconds(lambda lg=logits: plain(lg), repeat=50)
            entropy_s = cuda_seconds(lambda lg=logits: with_entropy(lg), repeat=50)
            print(
                f"  batch {size:3d}: sampler {sample_s * 1e3:.2f} ms, with entropy {entropy_s * 1e3:.2f} ms"
            )
            del batch
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
