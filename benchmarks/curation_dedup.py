"""Benchmark of curation dedup (components/curate/dedup.py); prints tables with ratios.

  (a) decode + resize to 256 px + pHash of synthetic 512 px JPEGs, one core: ours (JPEG
      draft decoding + batched pHash) against a naive per-image loop (PIL full decode,
      LANCZOS resize, imagehash.phash); also the hash-only variant of both.
  (b) perceptual (pHash, Hamming <= 4) + semantic (64-d cosine > 0.95) dedup of 10k, 100k
      and 1M items with 1% planted near-duplicates: seconds, recall, growth exponent.
  (c) the quadratic baselines: all-pairs Hamming and all-pairs cosine at 10k, extrapolated.

The machines are shared and noisy: every measurement is a median over repeats, A and B
alternate (A B B A ...) after a warm-up, and the load average is printed. Usage:
    .venv/bin/python benchmarks/curation_dedup.py           # full run, ~2 minutes
    .venv/bin/python benchmarks/curation_dedup.py --quick   # CI-sized, ~20 s, no 1M
    .venv/bin/python benchmarks/curation_dedup.py --json out.json

The naive baseline needs ``imagehash`` (``pip install imagehash==4.3.2``), a benchmark-only
dependency; without it part (a) reports our throughput alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from components.curate.dedup import (  # noqa: E402
    decode_draft,
    gray32,
    near_duplicate_groups,
    phash_batch,
    semantic_duplicates,
)

HASH_DISTANCE = 4  # pHash Hamming threshold (planted copies are 1..4 bits away)
COSINE = 0.95  # semantic threshold (planted copies at cosine 0.96..0.995)
DIM = 64
PLANTED = 0.01  # fraction of items that are planted near-copies of another item


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Per-core numbers: hold BLAS to one thread (PIL decoding is single-threaded anyway)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def median_times(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time per named run, alternating their order (ABBA...) after one warm-up each."""
    for fn in runs.values():
        fn()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def growth_exponent(n1: int, t1: float, n2: int, t2: float) -> float:
    """b in t ~ n**b between two sizes (1 = linear, 2 = quadratic)."""
    return math.log(t2 / t1) / math.log(n2 / n1)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a plain fixed-width table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


# --------------------------------------------------------------------------- (a) images


def synthetic_photo(rng: np.random.Generator, size: int = 512) -> Image.Image:
    """Smooth colour gradients + waves + shapes + sensor-like noise: JPEG sizes like photos (~60 KB)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        wave = np.sin(2 * np.pi * (c * xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4)))
        channels.append(128 + 80 * (a * xx + b * yy) + 40 * wave)
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(20, size // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    noisy += rng.normal(0, 6, noisy.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def bench_images(n_images: int, repeats: int, directory: Path) -> dict[str, Any]:
    """Part (a): images/s on one core, ours vs the naive imagehash loop."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):
        path = directory / f"{i:05d}.jpg"
        synthetic_photo(rng).save(path, quality=90)
        paths.append(path)
    mean_kb = float(np.mean([p.stat().st_size for p in paths]) / 1024)

    try:
        import imagehash
    except ImportError:
        imagehash = None
        print("imagehash is not installed: no naive baseline (pip install imagehash==4.3.2)")

    def ours_resize_hash() -> tuple[list[Image.Image], np.ndarray]:
        """Draft decode at 1/2 scale to the 256 px image, then one batched pHash."""
        # What curation needs: the 256 px image (decoded at 1/2 scale by libjpeg) and its pHash.
        images, grays = [], np.empty((len(paths), 32, 32), np.float32)
        for i, path in enumerate(paths):
            image = decode_draft(path, (256, 256))
            if image.size != (256, 256):
                image = image.resize((256, 256), Image.Resampling.LANCZOS)
            images.append(image)
            grays[i] = gray32(image)
        return images, phash_batch(grays)

    def ours_hash_only() -> np.ndarray:
        """Hash only: luma decoded at 1/8 scale, batched pHash."""
        grays = np.empty((len(paths), 32, 32), np.float32)
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                grays[i] = gray32(image)  # draft: luma only, at 1/8 scale
        return phash_batch(grays)

    runs: dict[str, Callable[[], Any]] = {"ours": ours_resize_hash, "ours_hash_only": ours_hash_only}
    if imagehash is not None:
        def naive_resize_hash() -> tuple[list[Image.Image], list[Any]]:
            """Per image: full decode, LANCZOS to 256 px, imagehash.phash."""
            images, hashes = [], []
            for path in paths:
                with Image.open(path) as image:
                    resized = image.resize((256, 256), Image.Resampling.LANCZOS)
                images.append(resized)
                hashes.append(imagehash.phash(resized))
            return images, hashes

        def naive_hash_only() -> list[Any]:
            """Per image: full decode, imagehash.phash."""
            hashes = []
            for path in paths:
                with Image.open(path) as image:
                    hashes.append(imagehash.phash(image))
            return hashes

        runs = {"naive": naive_resize_hash, "ours": ours_resize_hash,
                "naive_hash_only": naive_hash_only, "ours_hash_only": ours_hash_only}

    with one_blas_thread():
        seconds = median_times(runs, repeats)
    result: dict[str, Any] = {"images": n_images, "mean_jpeg_kb": mean_kb,
                              "images_per_s": {k: n_images / v for k, v in seconds.items()}}
    if imagehash is not None:
        ours = ours_resize_hash()[1]
        naive = np.array([int(str(h), 16) for h in naive_resize_hash()[1]], dtype=np.uint64)
        distance = np.bitwise_count(ours ^ naive)
        result["hamming_vs_naive"] = {"mean": float(distance.mean()), "max": int(distance.max())}
        result["speedup"] = seconds["naive"] / seconds["ours"]
        result["speedup_hash_only"] = seconds["naive_hash_only"] / seconds["ours_hash_only"]
    return result


# --------------------------------------------------------------------------- (b) dedup at scale


def planted_hashes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random 64-bit hashes; 1% of items are copies of another with 1..4 random bits flipped."""
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    m = int(n * PLANTED)
    perm = rng.permutation(n)
    src, dst = perm[:m], perm[m:2 * m]
    # Distinct bit positions per copy: the first k of a random permutation of 0..63.
    positions = np.argsort(rng.random((m, 64)), axis=1)[:, :HASH_DISTANCE]
    keep = np.arange(HASH_DISTANCE)[None, :] < rng.integers(1, HASH_DISTANCE + 1, size=m)[:, None]
    flips = np.bitwise_or.reduce(np.where(keep, np.uint64(1) << positions.astype(np.uint64), np.uint64(0)), axis=1)
    hashes[dst] = hashes[src] ^ flips
    return hashes, src, dst


def planted_embeddings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit vectors (no cluster structure: SemDeDup's hardest case); 1% near-copies at cos 0.96..0.995."""
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = int(n * PLANTED)
    perm = rng.permutation(n)
    src, dst = perm[:m], perm[m:2 * m]
    cos = rng.uniform(0.96, 0.995, m).astype(np.float32)
    noise = rng.standard_normal((m, DIM), dtype=np.float32)
    noise -= (noise * x[src]).sum(1, keepdims=True) * x[src]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos**2)[:, None] * noise
    return x, src, dst


def recall(kept: np.ndarray, src: np.ndarray, dst: np.ndarray) -> float:
    """Planted pairs whose later member was dropped (first occurrence wins)."""
    return float((~kept[np.maximum(src, dst)]).mean())


def bench_scale(sizes: list[int], repeats: dict[int, int]) -> list[dict[str, Any]]:
    """Part (b): seconds and recall of perceptual + semantic dedup per size."""
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        hashes, hs, hd = planted_hashes(rng, n)
        x, es, ed = planted_embeddings(rng, n)
        results: dict[str, Any] = {}

        def perceptual(hashes: np.ndarray = hashes) -> None:
            """pHash near-duplicates at Hamming <= 4."""
            results["perceptual"] = near_duplicate_groups(hashes, HASH_DISTANCE)

        def semantic(x: np.ndarray = x) -> None:
            """Semantic duplicates at cosine > 0.95."""
            results["semantic"] = semantic_duplicates(x, COSINE)

        seconds = median_times({"perceptual": perceptual, "semantic": semantic}, repeats[n])
        p, s = results["perceptual"], results["semantic"]
        rows.append({
            "n": n, "perceptual_s": seconds["perceptual"], "semantic_s": seconds["semantic"],
            "total_s": seconds["perceptual"] + seconds["semantic"],
            "perceptual_recall": recall(p.kept, hs, hd), "semantic_recall": recall(s.kept, es, ed),
            "perceptual_extra_drops": int((~p.kept).sum() - (~p.kept[np.maximum(hs, hd)]).sum()),
            "semantic_extra_drops": int((~s.kept).sum() - (~s.kept[np.maximum(es, ed)]).sum()),
        })
        print(f"  {n:>9,} items done ({rows[-1]['total_s']:.2f} s)", flush=True)
        del hashes, x, results
    return rows


# --------------------------------------------------------------------------- (c) quadratic baselines


def all_pairs_hamming(hashes: np.ndarray, max_distance: int, block: int = 256) -> int:
    """Blocked all-pairs Hamming distances (vectorised numpy); returns the number of close pairs."""
    close = 0
    for lo in range(0, hashes.size, block):
        d = np.bitwise_count(hashes[lo:lo + block, None] ^ hashes[None, :])
        close += int((d <= max_distance).sum())
    return close


def all_pairs_cosine(x: np.ndarray, threshold: float, block: int = 1024) -> int:
    """Blocked all-pairs cosine (BLAS); returns the number of pairs above the threshold."""
    close = 0
    for lo in range(0, x.shape[0], block):
        close += int((x[lo:lo + block] @ x.T > threshold).sum())
    return close


def bench_quadratic(n: int, repeats: int) -> dict[str, float]:
    """Part (c): all-pairs at ``n`` items; seconds."""
    rng = np.random.default_rng(1)
    hashes, _, _ = planted_hashes(rng, n)
    x, _, _ = planted_embeddings(rng, n)
    return median_times({"hamming": lambda: all_pairs_hamming(hashes, HASH_DISTANCE),
                         "cosine": lambda: all_pairs_cosine(x, COSINE)}, repeats)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, return (and optionally save) the numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer images, sizes up to 100k")
    parser.add_argument("--images", type=int, default=None, help="number of synthetic JPEGs (default 300, quick 80)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    n_images = args.images or (80 if args.quick else 300)
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    repeats = {10_000: 5, 100_000: 3, 1_000_000: 2}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"curation dedup benchmark: {cores} cores, load average {os.getloadavg()[0]:.2f} at start, "
          f"numpy {np.__version__}{', quick' if args.quick else ''}")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        images = bench_images(n_images, repeats=3 if args.quick else 5, directory=Path(tmp))
    ips = images["images_per_s"]
    rows = [["decode + resize 256 + pHash", f"{ips.get('naive', float('nan')):.0f}", f"{ips['ours']:.0f}",
             f"{images.get('speedup', float('nan')):.2f}x"],
            ["decode + pHash only", f"{ips.get('naive_hash_only', float('nan')):.0f}",
             f"{ips['ours_hash_only']:.0f}", f"{images.get('speedup_hash_only', float('nan')):.2f}x"]]
    table(f"(a) {images['images']} synthetic 512 px JPEGs (mean {images['mean_jpeg_kb']:.0f} KB), "
          "images/s on one core (median)", ["task", "naive PIL+imagehash", "ours", "ratio"], rows)
    if "hamming_vs_naive" in images:
        h = images["hamming_vs_naive"]
        print(f"    our pHash vs imagehash on the same file: mean {h['mean']:.2f} bits apart, max {h['max']}")

    print("\n(b) running perceptual + semantic dedup ...")
    scale = bench_scale(sizes, repeats)
    rows = []
    for i, r in enumerate(scale):
        growth = ["", "", ""]
        if i:
            p = scale[i - 1]
            growth = [f"{growth_exponent(p['n'], p[k], r['n'], r[k]):.2f}"
                      for k in ("perceptual_s", "semantic_s", "total_s")]
        rows.append([f"{r['n']:,}", f"{int(r['n'] * PLANTED):,}", f"{r['perceptual_s']:.3f}", growth[0],
                     f"{r['perceptual_recall']:.4f}",
                     f"{r['semantic_s']:.3f}", growth[1], f"{r['semantic_recall']:.4f}",
                     f"{r['total_s']:.3f}", growth[2]])
    table(f"(b) dedup, {cores} cores, 1% planted near-duplicates (pHash <= {HASH_DISTANCE} bits; "
          f"{DIM}-d cosine > {COSINE}), median seconds; exponent b in t ~ n^b vs the previous size",
          ["items", "planted", "pHash s", "b", "recall", "semantic s", "b", "recall", "total s", "b"], rows)
    extra = [(r["perceptual_extra_drops"], r["semantic_extra_drops"]) for r in scale]
    print(f"    items dropped that were not planted copies (perceptual, semantic): {extra}")

    quadratic_n = 10_000
    quadratic = bench_quadratic(quadratic_n, repeats=3)
    rows = []
    for n in sizes:
        ours = next(r for r in scale if r["n"] == n)
        factor = (n / quadratic_n) ** 2
        rows.append([f"{n:,}", f"{quadratic['hamming'] * factor:.1f}", f"{ours['perceptual_s']:.3f}",
                     f"{quadratic['hamming'] * factor / ours['perceptual_s']:.0f}x",
                     f"{quadratic['cosine'] * factor:.1f}", f"{ours['semantic_s']:.3f}",
                     f"{quadratic['cosine'] * factor / ours['semantic_s']:.0f}x"])
    table(f"(c) all-pairs baselines measured at {quadratic_n:,} (Hamming {quadratic['hamming']:.3f} s, "
          f"cosine {quadratic['cosine']:.3f} s), larger sizes extrapolated as n^2",
          ["items", "all-pairs Hamming s", "ours", "ratio", "all-pairs cosine s", "ours", "ratio"], rows)

    elapsed = time.perf_counter() - started
    print(f"\ntotal benchmark time {elapsed:.0f} s, load average {os.getloadavg()[0]:.2f} at the end")
    results = {"cores": cores, "images": images, "scale": scale, "quadratic_10k_s": quadratic,
               "elapsed_s": elapsed}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
