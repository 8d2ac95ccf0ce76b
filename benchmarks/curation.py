"""Curation benchmark: every throughput target of the curation issue, each against a baseline timed in the same run.

  (1) decode + resize to 256 px + pHash of synthetic 512 px JPEGs, one core: ours (JPEG draft
      decoding + batched pHash) against a naive per-image loop (PIL full decode, LANCZOS
      resize, imagehash.phash); also the hash-only variant of both. Target: >= 2x.
  (2) perceptual (pHash, Hamming <= 4) + semantic (64-d cosine > 0.95) dedup of 10k, 100k and
      1M items with 1% planted near-duplicates: seconds, recall, growth exponent; and the
      quadratic baselines (all-pairs Hamming / cosine at 10k, extrapolated as n^2).
      Targets: 1M in < 30 s on 2 cores, recall >= 0.99, growth well below quadratic.
  (3) `dvc add` of a directory of curated WebDataset tar shards against `md5sum` over the
      same bytes; every `dvc add` really hashes (no .dvc file, cache or hash database left
      from the previous run). Default cache type and `cache.type hardlink`. Target: <= 2x.
  (4) the filter stack on real images (Tux Paint stamps), one core: decode, crop to bucket +
      analysis copy, output PNG, caption cleanup, perceptual hash and each content scorer,
      images/s per stage, so the slowest filter is visible. Model load times apart.

The machines are shared and noisy: every measurement is a median over repeats, A and B
alternate (A B B A ...) after a warm-up, and the load average is printed. Usage:
    .venv/bin/python benchmarks/curation.py                  # full run, a few minutes
    .venv/bin/python benchmarks/curation.py --quick          # CI-sized, under a minute
    .venv/bin/python benchmarks/curation.py --json out.json  # also write the numbers
    .venv/bin/python benchmarks/curation.py --parts dvc,stack

The naive baseline of (1) needs ``imagehash`` (the test extra installs it); without it part (1)
reports our throughput alone. Part (3) needs ``md5sum`` (coreutils) and ``dvc``; part (4)
needs the Tux Paint stamps (Debian ``tuxpaint-stamps-default``). A part whose inputs are
missing says so and is skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
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
PARTS = ("hash", "dedup", "dvc", "stack")

# Targets from the curation issue.
HASH_SPEEDUP_TARGET = 2.0  # (1) ours / naive, images/s per core
DEDUP_1M_SECONDS_TARGET = 30.0  # (2) perceptual + semantic at 1M items, 2 cores
RECALL_TARGET = 0.99  # (2) planted near-duplicates found
GROWTH_EXPONENT_LIMIT = 1.5  # (2) "not quadratic": t ~ n^b with b at most this from 10k to the largest size
DVC_RATIO_TARGET = 2.0  # (3) dvc add / md5sum
# Below this md5sum time, dvc add's per-byte cost is lost in its ~1 s start-up noise.
MIN_MD5SUM_SECONDS = 0.2

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
WARMUP_IMAGES = 4  # (4) images of the warm-up call that loads the models


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


def median_times(runs: dict[str, Callable[[], Any]], repeats: int,
                 setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Median wall time per named run, alternating their order (ABBA...) after one warm-up each.

    ``setup[name]``, when given, runs untimed right before every run of ``name`` (e.g. to
    clear a cache so that the timed run does the full work again).
    """
    setup = setup or {}
    names = list(runs)
    for name in names:
        if name in setup:
            setup[name]()
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def growth_exponent(n1: int, t1: float, n2: int, t2: float) -> float:
    """b in t ~ n**b between two sizes (1 = linear, 2 = quadratic)."""
    return math.log(t2 / t1) / math.log(n2 / n1)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a plain fixed-width table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        # First column (the label) left-aligned, numbers right-aligned.
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- (1) images


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
    """Part (1): images/s on one core, ours vs the naive imagehash loop."""
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
        print("imagehash is not installed: no naive baseline (install the test extra: pip install -e '.[test]')")

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


def report_images(images: dict[str, Any]) -> None:
    """Print part (1)'s table."""
    ips = images["images_per_s"]
    rows = [["decode + resize 256 + pHash", f"{ips.get('naive', float('nan')):.0f}", f"{ips['ours']:.0f}",
             f"{images.get('speedup', float('nan')):.2f}x"],
            ["decode + pHash only", f"{ips.get('naive_hash_only', float('nan')):.0f}",
             f"{ips['ours_hash_only']:.0f}", f"{images.get('speedup_hash_only', float('nan')):.2f}x"]]
    table(f"(1) {images['images']} synthetic 512 px JPEGs (mean {images['mean_jpeg_kb']:.0f} KB), "
          "images/s on one core (median)", ["task", "naive PIL+imagehash", "ours", "ratio ours/naive"], rows)
    if "hamming_vs_naive" in images:
        h = images["hamming_vs_naive"]
        print(f"    our pHash vs imagehash on the same file: mean {h['mean']:.2f} bits apart, max {h['max']}")


# --------------------------------------------------------------------------- (2) dedup at scale


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
    """Part (2): seconds and recall of perceptual + semantic dedup per size."""
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
    """The quadratic baselines of part (2): all-pairs at ``n`` items; seconds."""
    rng = np.random.default_rng(1)
    hashes, _, _ = planted_hashes(rng, n)
    x, _, _ = planted_embeddings(rng, n)
    return median_times({"hamming": lambda: all_pairs_hamming(hashes, HASH_DISTANCE),
                         "cosine": lambda: all_pairs_cosine(x, COSINE)}, repeats)


def report_scale(scale: list[dict[str, Any]], quadratic: dict[str, float], quadratic_n: int, cores: int) -> None:
    """Print part (2)'s tables: our dedup per size, then the all-pairs baselines."""
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
    table(f"(2) dedup, {cores} cores, 1% planted near-duplicates (pHash <= {HASH_DISTANCE} bits; "
          f"{DIM}-d cosine > {COSINE}), median seconds; exponent b in t ~ n^b vs the previous size",
          ["items", "planted", "pHash s", "b", "recall", "semantic s", "b", "recall", "total s", "b"], rows)
    extra = [(r["perceptual_extra_drops"], r["semantic_extra_drops"]) for r in scale]
    print(f"    items dropped that were not planted copies (perceptual, semantic): {extra}")
    rows = []
    for r in scale:
        factor = (r["n"] / quadratic_n) ** 2
        rows.append([f"{r['n']:,}", f"{quadratic['hamming'] * factor:.1f}", f"{r['perceptual_s']:.3f}",
                     f"{quadratic['hamming'] * factor / r['perceptual_s']:.0f}x",
                     f"{quadratic['cosine'] * factor:.1f}", f"{r['semantic_s']:.3f}",
                     f"{quadratic['cosine'] * factor / r['semantic_s']:.0f}x"])
    table(f"(2) all-pairs baselines measured at {quadratic_n:,} (Hamming {quadratic['hamming']:.3f} s, "
          f"cosine {quadratic['cosine']:.3f} s), larger sizes extrapolated as n^2",
          ["items", "all-pairs Hamming s", "ours", "ratio", "all-pairs cosine s", "ours", "ratio"], rows)


# --------------------------------------------------------------------------- (3) dvc add vs md5sum


def write_curated_shards(directory: Path, total_bytes: int, rng: np.random.Generator) -> list[Path]:
    """WebDataset tar shards like a curated dataset's: 256 samples each of png + txt + json.

    The "png" members are random bytes (PNG data is deflate-compressed, so it hashes like
    random bytes), log-normal around 96 KB, about what a 256-512 px curated PNG weighs.
    """
    from components.storage import ShardWriter

    written, index = 0, 0
    writer = ShardWriter(directory, "samples", 256)
    while written < total_bytes:
        size = int(np.clip(rng.lognormal(math.log(96 * 1024), 0.5), 8 * 1024, 1 << 20))
        caption = f"a curated sample number {index} with a caption of ordinary length"
        meta = {"id": f"s{index:07d}", "caption": caption, "bucket": "1:1", "media": "image"}
        writer.write(f"s{index:07d}", {"png": rng.bytes(size), "txt": caption.encode(),
                                       "json": json.dumps(meta, sort_keys=True).encode()})
        written += size
        index += 1
    return writer.close()


def _dvc_command() -> list[str]:
    """The project's dvc: the console script beside this Python, else `python -m dvc`."""
    script = Path(sys.executable).with_name("dvc")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dvc"]


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a command quietly; a failure raises with its stderr."""
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd} (exit {done.returncode}): {done.stderr.strip()}")


def bench_dvc_add(total_mb: int, repeats: int, directory: Path) -> dict[str, Any]:
    """Part (3): `dvc add <shards dir>` (default cache type, and hardlink) against `md5sum` of the same files.

    Before every timed `dvc add`, the .dvc file, the cache (.dvc/cache), .dvc/tmp and DVC's
    site cache dir are deleted. The site cache dir (set inside the temp repo with
    core.site_cache_dir) holds DVC 3's hash database (repo/<token>/hashes/local/cache.db),
    which maps (inode, mtime, size) to a known md5: left in place, `dvc add` would skip
    hashing. DVC hashes the files of a directory on several threads; `md5sum` is one process,
    so a second baseline runs one `md5sum` per core (not a target, for reading the numbers).
    "fixed cost" is `dvc add` of a directory holding one 1 KB file, cleared the same
    way: start-up, repo and git checks, writing the .dvc file and .gitignore, with almost no
    bytes to read.
    All runs read the files from the page cache (each variant is warmed up first), so this
    compares hashing + bookkeeping, not disk reads.
    """
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    repo = directory / "repo"
    data = repo / "shards"
    site_cache = directory / "dvc-site-cache"
    repo.mkdir()
    shards = write_curated_shards(data, total_mb * 2**20, np.random.default_rng(3))
    total_bytes = sum(p.stat().st_size for p in shards)
    dvc = _dvc_command()
    _run(["git", "init", "-q"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)

    def configure(cache_type: str | None) -> None:
        """Write .dvc/config: autostage off, no update check, the site cache dir in the temp dir."""
        lines = ["[core]", "    autostage = false", "    check_update = false", "    analytics = false",
                 f"    site_cache_dir = {site_cache}"]
        if cache_type:
            lines += ["[cache]", f"    type = {cache_type}"]
        (repo / ".dvc" / "config").write_text("\n".join(lines) + "\n")

    tiny = repo / "tiny"
    tiny.mkdir()
    (tiny / "one.txt").write_bytes(b"x" * 1024)

    def forget(cache_type: str | None) -> Callable[[], None]:
        """Setup for a timed `dvc add` that must hash everything again."""
        def clear() -> None:
            configure(cache_type)
            for name in ("shards.dvc", "tiny.dvc"):
                (repo / name).unlink(missing_ok=True)
            for path in (repo / ".dvc" / "cache", repo / ".dvc" / "tmp", site_cache):
                shutil.rmtree(path, ignore_errors=True)
        return clear

    names = [str(p.relative_to(repo)) for p in shards]
    cores = cpu_cores()

    def md5sum_per_core() -> None:
        """One md5sum process per core over interleaved slices of the files (DVC hashes files on threads)."""
        workers = [subprocess.Popen(["md5sum", *names[i::cores]], cwd=repo, stdout=subprocess.DEVNULL)
                   for i in range(min(cores, len(names)))]
        if any(w.wait() for w in workers):
            raise RuntimeError(f"md5sum failed in {repo}")

    dvc_add = [*dvc, "add", "-q", "shards"]
    runs = {
        "md5sum": lambda: _run(["md5sum", *names], repo, env),
        "md5sum_per_core": md5sum_per_core,
        "dvc_add_default": lambda: _run(dvc_add, repo, env),
        "dvc_add_hardlink": lambda: _run(dvc_add, repo, env),
        "dvc_add_fixed_cost": lambda: _run([*dvc, "add", "-q", "tiny"], repo, env),
    }
    setup = {"dvc_add_default": forget(None), "dvc_add_hardlink": forget("hardlink"),
             "dvc_add_fixed_cost": forget(None)}
    seconds = median_times(runs, repeats, setup)
    # What the default cache type ("reflink,copy") does on this filesystem: reflink where supported, else copy.
    probe = subprocess.run(["cp", "--reflink=always", str(shards[0]), str(directory / "reflink-probe")],
                           capture_output=True)
    default_kind = "reflink" if probe.returncode == 0 else "copy, no reflink here"
    return {"shards": len(shards), "bytes": total_bytes, "cores": cores, "seconds": seconds, "default_cache_kind": default_kind,
            "ratio_default": seconds["dvc_add_default"] / seconds["md5sum"],
            "ratio_hardlink": seconds["dvc_add_hardlink"] / seconds["md5sum"],
            **{f"marginal_ratio_{kind}": max(seconds[f"dvc_add_{kind}"] - seconds["dvc_add_fixed_cost"], 0.0)
               / seconds["md5sum"] for kind in ("default", "hardlink")}}


def report_dvc(result: dict[str, Any]) -> None:
    """Print part (3)'s table."""
    s, mb = result["seconds"], result["bytes"] / 2**20
    md5 = s["md5sum"]
    labels = {"md5sum": "md5sum (coreutils, one process)",
              "md5sum_per_core": f"md5sum, one process per core ({result['cores']})",
              "dvc_add_default": f"dvc add, default cache type ({result['default_cache_kind']})",
              "dvc_add_hardlink": "dvc add, cache.type hardlink",
              "dvc_add_fixed_cost": "dvc add of one 1 KB file (fixed cost)"}
    rows = [[labels[k], f"{v:.3f}", "" if k == "dvc_add_fixed_cost" else f"{mb / v:.0f}", f"{v / md5:.2f}x"]
            for k, v in s.items()]
    table(f"(3) {result['shards']} curated tar shards, {mb:.0f} MB, from the page cache, median seconds",
          ["command", "seconds", "MB/s", "ratio to md5sum"], rows)
    if not _per_byte_measurable(result):
        print(f"    per-byte ratio not measurable: md5sum takes under {MIN_MD5SUM_SECONDS} s at this size")
        return
    for kind in ("default", "hardlink"):
        marginal = result[f"marginal_ratio_{kind}"]
        print(f"    per byte (dvc add minus its fixed cost), {kind} cache: {marginal:.2f}x md5sum; "
              f"total ratio <= {DVC_RATIO_TARGET:g}x from {_break_even_mb(result, kind)}")


def _per_byte_measurable(result: dict[str, Any]) -> bool:
    """Whether the shards are big enough for "dvc add minus its fixed cost" to rise above the noise."""
    return result["seconds"]["md5sum"] >= MIN_MD5SUM_SECONDS


def _break_even_mb(result: dict[str, Any], kind: str) -> str:
    """Dataset size above which `dvc add` / md5sum falls to the target, from the fixed cost and per-byte ratio.

    ratio(size) = (fixed + marginal * t) / t with t = size / md5sum speed; it reaches the
    target at t = fixed / (target - marginal), and never if the per-byte ratio is above it.
    """
    marginal = result[f"marginal_ratio_{kind}"]
    if marginal >= DVC_RATIO_TARGET:
        return "no size (the per-byte cost alone is above the target)"
    md5_mb_per_s = result["bytes"] / 2**20 / result["seconds"]["md5sum"]
    seconds = result["seconds"]["dvc_add_fixed_cost"] / (DVC_RATIO_TARGET - marginal)
    return f"about {seconds * md5_mb_per_s:,.0f} MB"


# --------------------------------------------------------------------------- (4) the filter stack


def tuxpaint_samples(limit: int | None) -> list[tuple[str, bytes, str | None]]:
    """(id, PNG bytes, caption) of Tux Paint stamps, sorted; `limit` picks evenly across categories."""
    paths = sorted(TUXPAINT.rglob("*.png"))
    if limit is not None and limit < len(paths):
        paths = [paths[round(i * len(paths) / limit)] for i in range(limit)]
    samples = []
    for path in paths:
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip() if text.is_file() else None
        samples.append((path.relative_to(TUXPAINT).with_suffix("").as_posix(), path.read_bytes(), caption or None))
    return samples


def bench_filter_stack(samples: list[tuple[str, bytes, str | None]], repeats: int) -> dict[str, Any]:
    """Part (4): seconds per stage of the per-sample filter stack, one core, batches of curate.batch_size.

    Stages run batch by batch in pipeline order (each needs the previous one's output), so a
    neighbour that steals the core slows every stage alike instead of one stage's whole run.
    Each scorer's first call (model load + a batch of WARMUP_IMAGES) is timed apart, and the
    load time is that minus the batch's share at the measured speed; the timed passes follow.
    """
    import cv2
    import torch

    from components.config import CurateConfig
    from components.curate.captions import clean_caption
    from components.curate.scorers import ScoreBatch, build_scorers
    from components.curate.shard import _perceptual_hashes, _policy, analysis_copy, bucket_for, crop_to
    from components.media import decode_image, image_to_png_bytes

    config = CurateConfig()
    policy = _policy(config)
    sizes = config.bucket_sizes()
    scorers = build_scorers(config)
    torch.set_num_threads(1)  # the ONNX scorers follow torch's thread count
    cv2.setNumThreads(1)
    batches = [samples[i:i + config.batch_size] for i in range(0, len(samples), config.batch_size)]

    def run_batch(batch: list[tuple[str, bytes, str | None]], seconds: dict[str, float]) -> int:
        """Run every stage on one batch, adding each stage's time to `seconds`; returns how many decoded."""
        def timed(stage: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            out = fn()
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
            return out

        decoded = timed("decode", lambda: [decode_image(data, policy) for _, data, _ in batch])
        ok = [(sample, d) for sample, d in zip(batch, decoded, strict=True) if d.ok]

        def crop_and_analysis() -> tuple[list[Image.Image], list[np.ndarray]]:
            outs, analyses = [], []
            for _, d in ok:
                outs.append(crop_to(d.image, sizes[bucket_for(d.image.width, d.image.height, sizes)]))
                analyses.append(analysis_copy(d.image, config.analysis_side))
            return outs, analyses

        outs, analyses = timed("crop to bucket + analysis copy", crop_and_analysis)
        timed("output PNG encode", lambda: [image_to_png_bytes(out) for out in outs])
        raw_captions = [caption for (_, _, caption), _ in ok]
        captions = timed("caption cleanup", lambda: [clean_caption(c, config.captions).text for c in raw_captions])
        timed(f"perceptual hash ({config.dedup.hash})", lambda: _perceptual_hashes(analyses, config.dedup.hash))
        score_batch = ScoreBatch([sample_id for (sample_id, _, _), _ in ok], analyses, captions)
        context: dict[str, Any] = {}
        for scorer in scorers:
            context.update(timed(f"scorer: {scorer.name}", lambda scorer=scorer: scorer.score(score_batch, context)))
        return len(ok)

    with one_blas_thread():
        # First call of everything on a few images: model loads (once per process) + a small batch.
        first: dict[str, float] = {}
        warm_n = run_batch(samples[:WARMUP_IMAGES], first)
        passes: list[dict[str, float]] = []
        n_ok = 0
        for r in range(repeats):
            seconds: dict[str, float] = {}
            n_ok = sum(run_batch(b, seconds) for b in (batches if r % 2 == 0 else batches[::-1]))
            passes.append(seconds)
    stages = list(passes[0])
    median = {stage: statistics.median(p[stage] for p in passes) for stage in stages}
    # Decode sees every input; later stages only those that decoded (rejects are out already).
    counts = {stage: (len(samples) if stage == "decode" else n_ok) for stage in stages}
    per_image = {stage: median[stage] / max(counts[stage], 1) for stage in stages}
    load = {stage: max(first[stage] - warm_n * per_image[stage], 0.0) for stage in stages if stage.startswith("scorer")}
    total = sum(median.values())
    slowest = min(stages, key=lambda stage: counts[stage] / median[stage] if median[stage] else math.inf)
    return {"images": len(samples), "decoded": n_ok, "batch_size": config.batch_size,
            "analysis_side": config.analysis_side, "repeats": repeats, "seconds": median,
            "images_per_s": {stage: counts[stage] / median[stage] for stage in stages},
            "ms_per_image": {stage: 1000 * per_image[stage] for stage in stages},
            "share": {stage: median[stage] / total for stage in stages},
            "first_call_s": first, "model_load_s": load, "total_s": total, "slowest": slowest,
            "stack_images_per_s": n_ok / total}


def report_stack(result: dict[str, Any]) -> None:
    """Print part (4)'s table."""
    rows = []
    for stage, seconds in result["seconds"].items():
        load = result["model_load_s"].get(stage)
        rows.append([stage, f"{result['images_per_s'][stage]:.1f}", f"{result['ms_per_image'][stage]:.2f}",
                     f"{100 * result['share'][stage]:.1f}%", "" if load is None else f"{load:.2f}",
                     "<- slowest" if stage == result["slowest"] else ""])
    rows.append(["whole stack", f"{result['stack_images_per_s']:.1f}",
                 f"{1000 / result['stack_images_per_s']:.2f}", "100.0%", "", ""])
    table(f"(4) filter stack on {result['images']} Tux Paint stamps ({result['decoded']} decoded), one core, "
          f"batches of {result['batch_size']}, analysis side {result['analysis_side']}, "
          f"median of {result['repeats']} pass(es) after a warm-up; model load on one thread",
          ["stage", "images/s", "ms/image", "share", "model load s", ""], rows)
    print(f"    slowest stage: {result['slowest']} ({result['images_per_s'][result['slowest']]:.1f} images/s on one core)")


# --------------------------------------------------------------------------- summary


def summary(results: dict[str, Any], quick: bool) -> list[tuple[str, str]]:
    """(status, line) per target: PASS / FAIL, SKIP where the part did not run, INFO for no target."""
    lines: list[tuple[str, str]] = []
    images = results.get("hash")
    if images is not None:
        if "speedup" in images:
            ok = images["speedup"] >= HASH_SPEEDUP_TARGET
            lines.append(("PASS" if ok else "FAIL", f"(1) ratio decode+resize+pHash ours/naive: {images['speedup']:.2f}x "
                          f"(target >= {HASH_SPEEDUP_TARGET:g}x)"))
        else:
            lines.append(("SKIP", "(1) no naive baseline: imagehash is not installed"))
    scale = results.get("dedup")
    if scale is not None:
        rows, largest = scale["scale"], scale["scale"][-1]
        if largest["n"] >= 1_000_000:
            ok = largest["total_s"] < DEDUP_1M_SECONDS_TARGET
            lines.append(("PASS" if ok else "FAIL", f"(2) dedup of {largest['n']:,} items on {results['cores']} cores: "
                          f"{largest['total_s']:.1f} s (target < {DEDUP_1M_SECONDS_TARGET:g} s)"))
        else:
            lines.append(("SKIP", f"(2) 1M items not run ({'quick: ' if quick else ''}largest {largest['n']:,})"))
        worst = min(largest["perceptual_recall"], largest["semantic_recall"])
        lines.append(("PASS" if worst >= RECALL_TARGET else "FAIL",
                      f"(2) recall at {largest['n']:,}: perceptual {largest['perceptual_recall']:.4f}, "
                      f"semantic {largest['semantic_recall']:.4f} (target >= {RECALL_TARGET})"))
        b = growth_exponent(rows[0]["n"], rows[0]["total_s"], largest["n"], largest["total_s"])
        lines.append(("PASS" if b <= GROWTH_EXPONENT_LIMIT else "FAIL",
                      f"(2) growth {rows[0]['n']:,} -> {largest['n']:,}: t ~ n^{b:.2f} "
                      f"(target: not quadratic, b <= {GROWTH_EXPONENT_LIMIT})"))
    dvc = results.get("dvc")
    if dvc is not None:
        mb = dvc["bytes"] / 2**20
        note = f" at {mb:.0f} MB" + (" (quick: dvc's fixed cost dominates; judge on the full run)" if quick else "")
        for key, label in (("ratio_default", f"default cache, {dvc['default_cache_kind']}"),
                           ("ratio_hardlink", "cache.type hardlink")):
            ok = dvc[key] <= DVC_RATIO_TARGET
            lines.append(("PASS" if ok else "FAIL", f"(3) ratio dvc add/md5sum, {label}: {dvc[key]:.2f}x "
                          f"(target <= {DVC_RATIO_TARGET:g}x){note}"))
        if _per_byte_measurable(dvc):
            lines.append(("INFO", f"(3) per byte, without dvc's fixed {dvc['seconds']['dvc_add_fixed_cost']:.2f} s: "
                          f"{dvc['marginal_ratio_default']:.2f}x (default), {dvc['marginal_ratio_hardlink']:.2f}x "
                          f"(hardlink); total ratio <= {DVC_RATIO_TARGET:g}x from {_break_even_mb(dvc, 'default')} "
                          f"(default), {_break_even_mb(dvc, 'hardlink')} (hardlink)"))
    stack = results.get("stack")
    if stack is not None:
        slowest = stack["slowest"]
        lines.append(("INFO", f"(4) slowest filter stage: {slowest}, {stack['images_per_s'][slowest]:.1f} images/s "
                      f"on one core ({100 * stack['share'][slowest]:.0f}% of the stack); whole stack "
                      f"{stack['stack_images_per_s']:.1f} images/s"))
    return lines


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and the summary; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer images, sizes up to 100k, 20 MB of shards")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--images", type=int, default=None, help="synthetic JPEGs for (1) (default 300, quick 80)")
    parser.add_argument("--shards-mb", type=int, default=None, help="MB of tar shards for (3) (default 400, quick 20)")
    parser.add_argument("--stamps", type=int, default=None, help="Tux Paint stamps for (4) (default all, quick 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; known: {', '.join(PARTS)}")

    cores = cpu_cores()
    print(f"curation benchmark: {cores} cores, load average {os.getloadavg()[0]:.2f} at start, "
          f"numpy {np.__version__}{', quick' if args.quick else ''}; parts: {', '.join(parts)}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"cores": cores, "quick": args.quick, "date": time.strftime("%Y-%m-%d")}

    part_started = time.perf_counter()

    def part_done(name: str) -> None:
        """Record how long a part took (the stack's includes model loading)."""
        nonlocal part_started
        results.setdefault("part_seconds", {})[name] = time.perf_counter() - part_started
        part_started = time.perf_counter()

    if "hash" in parts:
        with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
            results["hash"] = bench_images(args.images or (80 if args.quick else 300),
                                           repeats=3 if args.quick else 5, directory=Path(tmp))
        report_images(results["hash"])
        part_done("hash")

    if "dedup" in parts:
        print("\n(2) running perceptual + semantic dedup ...", flush=True)
        sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
        scale = bench_scale(sizes, {10_000: 5, 100_000: 3, 1_000_000: 2})
        quadratic_n = 10_000
        quadratic = bench_quadratic(quadratic_n, repeats=3)
        results["dedup"] = {"scale": scale, "quadratic_n": quadratic_n, "quadratic_s": quadratic}
        report_scale(scale, quadratic, quadratic_n, cores)
        part_done("dedup")

    if "dvc" in parts:
        if shutil.which("md5sum") is None or shutil.which("git") is None:
            print("\n(3) skipped: md5sum (coreutils) or git is not on PATH")
        else:
            print("\n(3) running dvc add vs md5sum ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="curation-bench-dvc-") as tmp:
                results["dvc"] = bench_dvc_add(args.shards_mb or (20 if args.quick else 400),
                                               repeats=2 if args.quick else 5,
                                               directory=Path(tmp))
            report_dvc(results["dvc"])
            part_done("dvc")

    if "stack" in parts:
        if not TUXPAINT.is_dir():
            print(f"\n(4) skipped: no Tux Paint stamps at {TUXPAINT} (Debian package tuxpaint-stamps-default)")
        else:
            print("\n(4) running the filter stack (models load on the first batch) ...", flush=True)
            samples = tuxpaint_samples(args.stamps or (64 if args.quick else None))
            results["stack"] = bench_filter_stack(samples, repeats=1)
            report_stack(results["stack"])
            part_done("stack")

    lines = summary(results, args.quick)
    results["summary"] = [{"status": status, "target": line} for status, line in lines]
    print("\nsummary")
    for status, line in lines:
        print(f"  {status:4}  {line}")
    elapsed = time.perf_counter() - started
    results["elapsed_s"] = elapsed
    took = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results.get("part_seconds", {}).items())
    print(f"\ntotal benchmark time {elapsed:.0f} s ({took}), load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = any(status == "FAIL" for status, _ in lines)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
