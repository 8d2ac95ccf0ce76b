"""DiT training-step throughput on one GPU: eager against torch.compile, in model FLOP/s and MFU.

For sizing cluster recipes (recipes/cluster.yaml, infra/README.md): what one GPU does per second
with our generator and flow-matching loss at the shapes the cluster recipe trains. It needs only
PyTorch and the `models` package (no MLflow, KFP or data), so it runs on a bare GPU machine:

    python -m benchmarks.gpu_train_step --presets dit-b dit-l --json gpu_train_step.json

Shapes: 256 px images as the moviegen-tae codec's latents (16 channels, 32 x 32 cells, patch 2:
256 tokens) and 33-frame 256 px clips (5 latent frames: 1,280 tokens). Each step is the real
training step (models.flow.flow_matching_loss under bf16 autocast, backward, fused AdamW).
Eager (A) and compiled (B) rounds alternate after warm-up and the medians are reported; model
FLOPs come from models.dit.flops (checked against FlopCounterMode) and MFU is quoted against the
card's measured bf16 matmul rate (8192^3 products), not the datasheet's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from models.dit.flops import token_count, train_step_flops
from models.dit.model import PRESETS, build
from models.flow import FlowMatchingConfig, flow_matching_loss

SHAPES = {  # name -> (latent frames, latent height, latent width, batch size)
    "image-256px": (1, 32, 32, 64),
    "clip-33f-256px": (5, 32, 32, 8),
}


def matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate of this GPU (median of `repeats` products after warm-up)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def _batch(config, frames: int, height: int, width: int, batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, config.in_channels, frames, height, width)
    return {"x": torch.randn(shape, device="cuda", generator=generator),
            "tokens": torch.randn(batch, config.max_text_tokens, config.text_dim, device="cuda", generator=generator),
            "mask": torch.ones(batch, config.max_text_tokens, dtype=torch.bool, device="cuda"),
            "pooled": torch.randn(batch, config.text_dim, device="cuda", generator=generator)}


def _step(model, optimizer, batch, flow) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = flow_matching_loss(model, batch["x"], batch["tokens"], batch["mask"], batch["pooled"], flow)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(preset: str, shape: str, rounds: int, steps: int) -> dict[str, float | int | str]:
    """Median seconds per step for eager and compiled training of `preset` at `shape`."""
    frames, height, width, batch_size = SHAPES[shape]
    config = PRESETS[preset]
    torch.manual_seed(0)
    model = build(config, device="cuda").train()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch, flow = _batch(config, frames, height, width, batch_size), FlowMatchingConfig()
    variants = {"eager": model, "compiled": compiled}
    for module in variants.values():  # warm-up (and compilation)
        for _ in range(3):
            _step(module, optimizer, batch, flow)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, module in variants.items():  # A, B, A, B, ...
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                _step(module, optimizer, batch, flow)
            torch.cuda.synchronize()
            seconds[name].append((time.perf_counter() - start) / steps)
    tokens = token_count(config, frames, height, width)
    flops = train_step_flops(config, batch_size, tokens)
    eager, fast = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
    return {"preset": preset, "shape": shape, "batch": batch_size, "tokens": tokens,
            "eager_s": eager, "compiled_s": fast, "compile_speedup": eager / fast,
            "samples_per_s": batch_size / fast, "model_tflops": flops / fast / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print one line per preset and shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dit-b", "dit-l"], choices=sorted(PRESETS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=5, help="alternated eager/compiled rounds (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: measured bf16 matmul {peak:.0f} TFLOP/s; torch {torch.__version__}")
    results = []
    for preset in args.presets:
        for shape in args.shapes:
            row = measure(preset, shape, args.rounds, args.steps)
            row["mfu"] = row["model_tflops"] / peak
            results.append(row)
            print(f"{preset:8s} {shape:15s} batch {row['batch']:3d} x {row['tokens']:5d} tokens: "
                  f"eager {row['eager_s'] * 1e3:7.1f} ms, compiled {row['compiled_s'] * 1e3:7.1f} ms "
                  f"(x{row['compile_speedup']:.2f}); {row['samples_per_s']:7.1f} samples/s, "
                  f"{row['model_tflops']:5.0f} TFLOP/s = {row['mfu']:.0%} MFU; peak {row['peak_memory_gib']:.1f} GiB",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "matmul_tflops": peak,
                                         "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
