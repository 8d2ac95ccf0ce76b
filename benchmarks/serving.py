"""Serving benchmark: micro-batching (serve.max_batch 8) against batch-1 serving, same model, same machine.

Starts two real `reelforge serve` processes (uvicorn) on one model directory, one with
`serve.max_batch=8`, one with `serve.max_batch=1`, and drives each with 1 and 8 concurrent
closed-loop HTTP clients (each sends its next request when the previous one is answered).
Rounds alternate which server goes first (A/B, B/A, ...) so drift in machine load hits both;
each measurement starts with a warm-up; figures are medians over rounds. Only one server is
under load at a time (the idle one only waits on its socket).

Prints p50/p95 latency and throughput (requests/s) per server and concurrency, and the ratio
that decides whether micro-batching pays: throughput with max_batch 8 / with max_batch 1 at 8
clients (target >= 1.5x). At 1 client the two should match (batching adds at most
serve.batch_wait_ms of latency).

    .venv/bin/python benchmarks/serving.py                         # untrained demo-latent model, ~3 min
    .venv/bin/python benchmarks/serving.py --model-dir DIR --steps 4
    .venv/bin/python benchmarks/serving.py --quick                 # smoke: 1 round, short windows

The default model is an untrained model directory of the demo recipe's architecture (the
demo-latent DiT plus the demo autoencoder as its latent codec, random weights): the cost of a
request does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.5


def untrained_model_dir(directory: Path, recipe_name: str = "demo") -> Path:
    """A model directory of `recipe_name`'s architecture with random weights (DiT + autoencoder codec)."""
    import torch

    from components.config import load_recipe
    from models.autoencoder import AutoencoderConfig
    from models.autoencoder import build as build_autoencoder
    from models.checkpoint import save_model_dir, save_weights
    from models.dit import DiTConfig, build
    from models.generate import AUTOENCODER_FILE
    from models.latent import AutoencoderCodec

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    config = DiTConfig(**recipe.model_config_dict())
    model = build(config)
    with torch.no_grad():  # adaLN-zero starts at a zero velocity: give every weight some signal
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    latent: dict[str, Any] = {"kind": "pixel"}
    if recipe.autoencoder.kind == "vae":
        autoencoder = build_autoencoder(AutoencoderConfig.from_dict(recipe.autoencoder_config_dict())).eval()
        channels = autoencoder.config.latent_channels
        codec = AutoencoderCodec(autoencoder, torch.zeros(channels), torch.ones(channels))
        latent = codec.to_dict()
        save_weights(directory / AUTOENCODER_FILE, codec.weights())
    config_json = {
        "architecture": "dit",
        "model": config.to_dict(),
        "latent": latent,
        "text": recipe.text.model_dump(mode="json"),
        "flow": {"sigma_min": 1e-5},
        "sampling": recipe.register.sampling.model_dump(mode="json"),
        "name": f"untrained-{recipe_name}",
    }
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return save_model_dir(directory, weights, config_json, {"stage": "untrained", "step": 0, "metrics": {}})


class Server:
    """`reelforge serve --model-dir DIR --port 0` with overrides, as a child process."""

    def __init__(self, model_dir: Path, label: str, overrides: dict[str, Any], threads: int | None) -> None:
        self.label = label
        command = [sys.executable, "-m", "pipelines.cli", "serve", "--model-dir", str(model_dir),
                   "--host", "127.0.0.1", "--port", "0"]
        for key, value in overrides.items():
            command += ["--set", f"serve.{key}={value}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.url = ""
        self.log: list[str] = []

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Read the log until the `serving ... on URL` line."""
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        while not self.url:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"server {self.label} exited:\n" + "".join(self.log[-30:]))
            self.log.append(line)
            match = re.match(r"serving .* on (http://\S+)", line.strip())
            if match:
                self.url = match.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.label} not ready after {timeout_s} s")
        # Keep draining the log so the child never blocks on a full pipe.
        threading.Thread(target=lambda: [self.log.append(x) for x in self.process.stdout], daemon=True).start()

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Window:
    """One measurement: requests answered in a fixed window by `clients` closed-loop clients."""

    clients: int
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def throughput(self) -> float:
        """Requests answered per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        """Latency percentile in seconds (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def measure(url: str, clients: int, seconds: float, warmup_s: float, steps: int | None) -> Window:
    """`clients` threads POST back to back for `warmup_s` (discarded) and then `seconds` (measured)."""
    import httpx

    start_at = time.monotonic() + warmup_s
    stop_at = start_at + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            n = 0
            while True:
                began = time.monotonic()
                if began >= stop_at:
                    return
                body: dict[str, Any] = {"prompt": f"client {index} request {n}: a red apple on a table",
                                        "seed": index * 100_000 + n, "format": "png"}
                if steps:
                    body["steps"] = steps
                response = http.post("/v1/generate", json=body)
                ended = time.monotonic()
                n += 1
                with lock:
                    if response.status_code != 200:
                        errors[0] += 1
                    elif began >= start_at and ended <= stop_at:  # wholly inside the measured window
                        latencies.append(ended - began)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Window(clients, latencies, seconds, errors[0])


def main(argv: list[str] | None = None) -> int:
    """Run the A/B benchmark and print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="model directory (default: an untrained demo-latent one)")
    parser.add_argument("--recipe", default="demo", help="recipe whose architecture the default model has")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per request (0 = the model's default)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (medians over rounds)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per (server, concurrency)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before each window, seconds")
    parser.add_argument("--concurrency", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="serve.batch_wait_ms of the batching server")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the servers (0 = torch default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 s windows, 2 steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.steps = 1, 2.0, 0.5, 2
    concurrency = [int(c) for c in args.concurrency.split(",")]

    scratch = tempfile.TemporaryDirectory(prefix="reelforge-bench-serving-")
    model_dir = args.model_dir or untrained_model_dir(Path(scratch.name) / "model", args.recipe)
    common = {"queue_size": 256, "request_timeout_s": 600, "max_steps": max(args.steps, 100)}
    variants = {"batch8": {**common, "max_batch": 8, "batch_wait_ms": args.batch_wait_ms},
                "batch1": {**common, "max_batch": 1, "batch_wait_ms": 0}}
    servers = {label: Server(model_dir, label, overrides, args.threads) for label, overrides in variants.items()}
    results: dict[str, dict[int, list[Window]]] = {label: {c: [] for c in concurrency} for label in variants}
    try:
        for server in servers.values():
            server.wait_ready()
        print(f"model {model_dir} ({servers['batch8'].log[-1].strip() if servers['batch8'].log else ''}); "
              f"steps {args.steps or 'default'}; {args.rounds} rounds x {args.seconds:g} s windows, "
              f"{args.warmup:g} s warm-up; {os.cpu_count()} CPU cores", flush=True)
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for clients in concurrency:
                for label in order:
                    window = measure(servers[label].url, clients, args.seconds, args.warmup, args.steps or None)
                    results[label][clients].append(window)
                    print(f"round {round_index + 1} {label:6s} {clients} clients: {window.throughput:6.2f} req/s, "
                          f"p50 {window.percentile(50) * 1000:7.0f} ms, errors {window.errors}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        scratch.cleanup()

    summary: dict[str, Any] = {}
    print(f"\n{'server':8s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'errors':>6s}")
    for label in variants:
        for clients in concurrency:
            windows = results[label][clients]
            row = {"throughput": statistics.median(w.throughput for w in windows),
                   "p50_ms": statistics.median(w.percentile(50) for w in windows) * 1000,
                   "p95_ms": statistics.median(w.percentile(95) for w in windows) * 1000,
                   "errors": sum(w.errors for w in windows)}
            summary[f"{label}@{clients}"] = row
            print(f"{label:8s} {clients:7d} {row['throughput']:8.2f} {row['p50_ms']:8.0f} {row['p95_ms']:8.0f} "
                  f"{row['errors']:6d}")
    print()
    ratios = {}
    for clients in concurrency:
        batched, single = summary[f"batch8@{clients}"], summary[f"batch1@{clients}"]
        ratio = batched["throughput"] / single["throughput"] if single["throughput"] else float("nan")
        ratios[clients] = ratio
        p50 = batched["p50_ms"] / single["p50_ms"] if single["p50_ms"] else float("nan")
        print(f"ratio throughput max_batch 8 / max_batch 1 at {clients} clients: {ratio:.2f}x "
              f"(p50 latency ratio {p50:.2f}x)")
    top = max(concurrency)
    if top >= 8:
        verdict = "PASS" if ratios[top] >= TARGET_RATIO else "FAIL"
        print(f"{verdict}: micro-batching at {top} clients gives {ratios[top]:.2f}x the batch-1 throughput "
              f"(target >= {TARGET_RATIO}x)")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "ratios": {str(k): v for k, v in ratios.items()},
                                         "steps": args.steps, "rounds": args.rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
