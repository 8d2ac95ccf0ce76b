"""Curation, phase 1: score one raw shard. Everything here is per sample, so shards run in parallel.

For each raw item: sniff image vs video, decode safely (a broken file is quarantined with a reason
code), check geometry, cut videos into single-shot clips (scene cuts, motion, camera tags), crop
the sample to its aspect-ratio bucket at the output resolution, clean its caption, compute the
perceptual hash and run the content scorers (`components.curate.scorers`) in batches.
Nothing is dropped here except by decode, geometry and clip rules: thresholds on scores are the
merge phase's job (`components.curate.merge`), so changing a threshold never re-scores.

A scored shard is a directory:
  scores.parquet   one row per sample (images, clips, and quarantined/early-rejected inputs)
  embeddings.npy   float32 [n_scored, D] image embeddings; row i = the i-th row whose `embedding_row` is i
  samples.tar      output-ready media of every sample still in the running (png or mp4 + txt + json)
  done.json        written last: its presence means the shard is complete (resume skips it)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from components.config import CurateConfig
from components.media import (
    DecodePolicy,
    RejectReason,
    check_geometry,
    decode_image,
    image_to_png_bytes,
    sha256_file,
)
from components.storage import ShardWriter, code_fingerprint, iter_shard, sha256_json

SCORES = "scores.parquet"
EMBEDDINGS = "embeddings.npy"
SAMPLES = "samples"  # samples-00000.tar
DONE = "done.json"
# Bump when the scored-shard layout changes: old work directories are then never reused.
SHARD_FORMAT = "1"
# Modules whose code decides a scored shard's content (part of its resume/cache key).
SHARD_CODE = (
    "components.curate.shard",
    "components.curate.scorers",
    "components.curate.captions",
    "components.curate.aesthetic",
    "components.curate.video",
    "components.curate.dedup",
    "components.video",
    "components.media",
)
# Fields of the curate section that change phase-1 output (the rest only change the merge).
_SHARD_FIELDS = ("resolution", "buckets", "min_side", "max_aspect_ratio", "max_pixels", "max_bytes",
                 "allowed_formats", "background", "analysis_side", "scorers", "captions", "video", "aesthetic")


def bucket_for(width: int, height: int, sizes: dict[str, tuple[int, int]]) -> str:
    """The bucket whose aspect ratio is nearest (in log ratio) to width/height; ties go to the first listed."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda b: abs(math.log(sizes[b][0] / sizes[b][1]) - ratio))


def crop_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center-crop `image` to the aspect ratio of `size`, then resize to it (Lanczos, area-preserving look)."""
    target_w, target_h = size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    crop_w, crop_h = min(width, round(target_w / scale)), min(height, round(target_h / scale))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.LANCZOS)


def analysis_copy(image: Image.Image, side: int) -> np.ndarray:
    """RGB uint8 copy whose shorter side is at most `side` (never upscaled): what the scorers see."""
    width, height = image.size
    scale = side / min(width, height)
    if scale < 1:
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"))


def shard_key(config: CurateConfig, raw_shard: Path) -> str:
    """Resume/cache key of a scored shard: the raw shard's bytes, the phase-1 config and code, the review labels."""
    section = config.model_dump(mode="json")
    review = config.aesthetic.review_dir
    review_files = {}
    if review:
        review_files = {p.name: sha256_file(p) for p in sorted(Path(review).glob("*")) if p.is_file()}
    return sha256_json({
        "format": SHARD_FORMAT,
        "raw": sha256_file(raw_shard),
        "config": {k: section[k] for k in _SHARD_FIELDS},
        "review": review_files,
        "code": code_fingerprint(SHARD_CODE),
    })


@dataclass
class _Prepared:
    """One sample after decode/crop, before model scoring (lives only inside a worker)."""

    row: dict[str, Any]
    analysis: np.ndarray | None = None  # what scorers see; None when the sample is already out
    media: dict[str, bytes] | None = None  # output members (png or mp4)


def _policy(config: CurateConfig) -> DecodePolicy:
    return DecodePolicy(allowed_formats=frozenset(config.allowed_formats), max_pixels=config.max_pixels,
                        max_bytes=config.max_bytes, background=tuple(config.background))


def _clean(raw: Any, config: CurateConfig) -> tuple[str | None, str]:
    from components.curate.captions import clean_caption

    cleaned = clean_caption(raw if isinstance(raw, str) else None, config.captions)
    return cleaned.text, ",".join(cleaned.changes)


def _prepare_image(meta: dict[str, Any], data: bytes, config: CurateConfig, base: dict[str, Any]) -> list[_Prepared]:
    decoded = decode_image(data, _policy(config))
    row = {**base, "media": "image", "format": decoded.format, "mode": decoded.mode,
           "width": decoded.width, "height": decoded.height, "repairs": ",".join(decoded.repairs)}
    if not decoded.ok:
        return [_Prepared({**row, "status": "quarantined", "reason": str(decoded.reason),
                           "detail": f"{meta['source_path']}: {decoded.detail}"})]
    width, height = decoded.image.size
    short, long = sorted((width, height))
    row["aspect_ratio"] = long / max(short, 1)
    geometry = check_geometry(width, height, min_side=config.min_side, max_aspect_ratio=config.max_aspect_ratio)
    if geometry is RejectReason.TOO_SMALL:
        return [_Prepared({**row, "status": "rejected", "reason": str(geometry),
                           "detail": f"shorter side {short}px < curate.min_side {config.min_side}px"})]
    if geometry is RejectReason.BAD_ASPECT_RATIO:
        return [_Prepared({**row, "status": "rejected", "reason": str(geometry),
                           "detail": f"aspect ratio {long / short:.2f} > curate.max_aspect_ratio {config.max_aspect_ratio}"})]
    sizes = config.bucket_sizes()
    bucket = bucket_for(width, height, sizes)
    out = crop_to(decoded.image, sizes[bucket])
    row.update(status="ok", reason=None, detail=None, bucket=bucket, out_width=out.width, out_height=out.height)
    return [_Prepared(row, analysis_copy(decoded.image, config.analysis_side), {"png": image_to_png_bytes(out)})]


def _prepare_video(meta: dict[str, Any], data: bytes, config: CurateConfig, base: dict[str, Any]) -> list[_Prepared]:
    from components.curate.video import caption_with_camera, split_video
    from components.video import VideoError, decode_frames, encode_mp4, probe_video

    video = config.video
    row = {**base, "media": "video", "format": "video", "repairs": ""}
    limits = dict(source=meta["source_path"], max_bytes=config.max_bytes, max_pixels=config.max_pixels)
    try:
        info = probe_video(data, **limits)
        row.update(width=info.width, height=info.height, fps=info.fps, duration_s=info.duration_s, format=info.codec)
        if info.fps < video.min_fps:
            return [_Prepared({**row, "status": "rejected", "reason": str(RejectReason.LOW_FPS),
                               "detail": f"{info.fps:.1f} fps < curate.video.min_fps {video.min_fps}"})]
        short, long = sorted((info.width, info.height))
        row["aspect_ratio"] = long / max(short, 1)
        geometry = check_geometry(info.width, info.height, min_side=config.min_side,
                                  max_aspect_ratio=config.max_aspect_ratio)
        if geometry is not None:
            limit = (f"shorter side {short}px < curate.min_side {config.min_side}px" if geometry is RejectReason.TOO_SMALL
                     else f"aspect ratio {long / short:.2f} > curate.max_aspect_ratio {config.max_aspect_ratio}")
            return [_Prepared({**row, "status": "rejected", "reason": str(geometry), "detail": limit})]
        sizes = config.bucket_sizes()
        # Decode so that the *shorter* side still covers the analysis copy and the largest bucket side.
        need = max(config.analysis_side, *(max(size) for size in sizes.values()))
        frames, fps = decode_frames(data, fps=video.fps, max_side=int(np.ceil(need * long / max(short, 1))),
                                    max_seconds=video.max_seconds, **limits)
    except VideoError as error:
        return [_Prepared({**row, "status": "quarantined", "reason": str(error.reason), "detail": str(error)})]
    # The bucket comes from the decoded frames: they carry the display rotation, the header does not.
    bucket = bucket_for(frames.shape[2], frames.shape[1], sizes)
    out_size = sizes[bucket]
    prepared = []
    for clip in split_video(frames, fps, video):
        clip_row = {**row, "id": f"{base['id']}c{clip.index:03d}", "parent_id": base["id"],
                    "clip_start_s": clip.start_s, "clip_end_s": clip.end_s, "motion": clip.motion,
                    "jitter": clip.jitter, "camera": clip.camera, "bucket": bucket,
                    "out_width": out_size[0], "out_height": out_size[1]}
        if video.camera_tags and clip_row.get("caption"):
            clip_row["caption"] = caption_with_camera(clip_row["caption"], clip.camera)
        if clip.reason is not None:
            prepared.append(_Prepared({**clip_row, "status": "rejected", "reason": str(clip.reason), "detail": clip.detail}))
            continue
        middle = Image.fromarray(clip.frames[len(clip.frames) // 2])
        resized = np.stack([np.asarray(crop_to(Image.fromarray(f), out_size)) for f in clip.frames])
        prepared.append(_Prepared({**clip_row, "status": "ok", "reason": None, "detail": None},
                                  analysis_copy(middle, config.analysis_side),
                                  {"mp4": encode_mp4(resized, fps)}))
    return prepared


def _prepare(meta: dict[str, Any], data: bytes, raw_row: dict[str, Any], config: CurateConfig) -> list[_Prepared]:
    """Decode one raw item into zero or more samples (a video gives one per clip); never raises for bad files."""
    from components.video import is_video

    caption, changes = _clean(raw_row.get("caption"), config)
    base = {
        "id": meta["id"], "parent_id": meta["id"], "source_path": meta["source_path"],
        "caption_raw_chars": len(raw_row["caption"]) if isinstance(raw_row.get("caption"), str) else 0,
        "caption": caption, "caption_source": raw_row.get("caption_source") if caption else "none",
        "caption_cleanup": changes, "category": raw_row.get("category"),
        "sha256": raw_row["sha256"], "bytes": raw_row["bytes"],
    }
    if data and is_video(data):
        return _prepare_video(meta, data, config, base)
    return _prepare_image(meta, data, config, base)


def _perceptual_hashes(images: list[np.ndarray], kind: str) -> np.ndarray:
    from components.curate.dedup import dhash_batch, gray32, gray_thumbnail, phash_batch

    if kind == "dhash":
        return dhash_batch(np.stack([gray_thumbnail(Image.fromarray(image), (9, 8)) for image in images]))
    return phash_batch(np.stack([gray32(Image.fromarray(image)) for image in images]))


def _score_chunk(task: tuple[list[tuple[dict, bytes, dict]], CurateConfig]) -> tuple[list[dict], np.ndarray, list[dict | None]]:
    """Worker: prepare a chunk of raw items and score the survivors in model batches."""
    from components.curate.captions import tagger_caption
    from components.curate.scorers import ScoreBatch, build_scorers, score_batch

    items, config = task
    prepared = [p for meta, data, raw_row in items for p in _prepare(meta, data, raw_row, config)]
    live = [p for p in prepared if p.analysis is not None]
    embeddings = np.zeros((0, 0), np.float32)
    if live:
        hashes = _perceptual_hashes([p.analysis for p in live], config.dedup.hash)
        for p, value in zip(live, hashes):
            p.row["phash"] = int(np.int64(np.uint64(value).view(np.int64)))  # parquet has no uint64 everywhere
        scorers = build_scorers(config)
        parts = []
        for start in range(0, len(live), config.batch_size):
            chunk = live[start : start + config.batch_size]
            batch = ScoreBatch([p.row["id"] for p in chunk], [p.analysis for p in chunk], [p.row["caption"] for p in chunk])
            scores = score_batch(scorers, batch)
            for i, p in enumerate(chunk):
                for column, values in scores.items():
                    if column in ("features", "tags", "class_probs"):
                        continue
                    p.row[column] = float(values[i])
                if "tags" in scores:
                    p.row["tags"] = ", ".join(scores["tags"][i]) if isinstance(scores["tags"][i], (list, tuple)) else str(scores["tags"][i])
            if "features" in scores:
                parts.append(np.asarray(scores["features"], np.float32))
        if parts:
            embeddings = np.concatenate(parts)
        for p in live:
            if not p.row.get("caption") and config.captions.tagger and p.row.get("tags"):
                p.row["caption"] = tagger_caption(p.row["tags"].split(", "))
                p.row["caption_source"] = "tagger"
    return [p.row for p in prepared], embeddings, [p.media for p in prepared]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _worker_init() -> None:
    # One torch/ONNX/OpenCV thread per worker (BLAS: see _scoring_map): the pool is the parallelism.
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


@dataclass(frozen=True)
class ShardJob:
    """One raw shard to score and the directory its scores go to."""

    raw_shard: Path
    out_dir: Path
    raw_rows: dict[str, dict[str, Any]]  # raw manifest rows of this shard, by id


def _read_items(job: ShardJob) -> list[tuple[dict, bytes, dict]]:
    items = []
    for sample in iter_shard(job.raw_shard):
        meta = json.loads(sample.members["json"])
        if meta["id"] not in job.raw_rows:
            raise ValueError(f"{job.raw_shard}: sample {meta['id']} is not in the raw manifest")
        items.append((meta, sample.members.get("bin", b""), job.raw_rows[meta["id"]]))
    missing = set(job.raw_rows) - {meta["id"] for meta, _, _ in items}
    if missing:
        raise ValueError(f"{job.raw_shard}: the raw manifest lists {len(missing)} sample(s) that the shard lacks, "
                         f"e.g. {sorted(missing)[:3]}; re-run ingest")
    return items


def _finish(job: ShardJob, n_items: int, results: list[tuple[list[dict], np.ndarray, list[dict | None]]]) -> None:
    """Write one scored shard from its chunks' results: temp dir, then rename (a crash never looks finished)."""
    temp = job.out_dir.with_name(job.out_dir.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    rows: list[dict] = []
    embeddings: list[np.ndarray] = []
    n_embedded = 0
    with ShardWriter(temp, SAMPLES, 1 << 30) as writer:
        for chunk_rows, chunk_embeddings, media in results:
            live = 0
            for row, members in zip(chunk_rows, media):
                row["embedding_row"] = -1
                if members is not None:
                    if len(chunk_embeddings):
                        row["embedding_row"] = n_embedded + live
                    live += 1
                    meta = {k: row.get(k) for k in ("id", "caption", "caption_source", "category", "bucket", "media")}
                    writer.write(row["id"], {**members, "txt": (row.get("caption") or "").encode(),
                                             "json": json.dumps(meta, sort_keys=True).encode()})
                rows.append(row)
            if len(chunk_embeddings):
                embeddings.append(chunk_embeddings)
                n_embedded += len(chunk_embeddings)
    frame = pd.DataFrame(rows)
    if "phash" in frame:  # rows without a hash would make the column float64, which keeps only 53 of 64 bits
        frame["phash"] = frame["phash"].astype("Int64")
    frame.to_parquet(temp / SCORES, index=False)
    np.save(temp / EMBEDDINGS, np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32))
    (temp / DONE).write_text(json.dumps({"raw_shard": job.raw_shard.name, "items": n_items, "samples": len(rows)}))
    shutil.rmtree(job.out_dir, ignore_errors=True)
    temp.rename(job.out_dir)


def score_shards(config: CurateConfig, jobs: list[ShardJob], workers: int = 1, on_progress: Any = None) -> int:
    """Score the raw shards of `jobs` that are not finished yet; returns how many were skipped as done.

    One worker pool serves all shards (models load once per worker, not once per shard). Shards
    are read one at a time, so memory holds one raw shard's bytes, not the dataset's; within a
    shard, chunks of `curate.batch_size` items are the unit of work. Each shard is written as
    soon as it is done, so a crash loses at most the shard in flight. `on_progress(n)` is called
    with the number of raw items finished.
    """
    pending = [job for job in jobs if not (job.out_dir / DONE).is_file()]
    skipped = len(jobs) - len(pending)
    if on_progress is not None and skipped:
        on_progress(sum(len(job.raw_rows) for job in jobs if job not in pending))
    with _scoring_map(workers) as map_chunks:
        for job in pending:
            items = _read_items(job)
            results = []
            for chunk, result in zip(_chunks(items, max(1, config.batch_size)),
                                     map_chunks([(c, config) for c in _chunks(items, max(1, config.batch_size))])):
                results.append(result)
                if on_progress is not None:
                    on_progress(len(chunk))
            _finish(job, len(items), results)
    return skipped


_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextmanager
def _scoring_map(workers: int) -> Iterator[Any]:
    """A `map` over scoring tasks: a spawn pool of `workers` processes, or this process when 1.

    Either way every scorer runs single-threaded (torch, ONNX, OpenCV, BLAS), so scores (float
    sums inside the models) and the dataset hash do not depend on how many workers ran.
    """
    if workers <= 1:
        import cv2
        import torch

        threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        try:
            with _blas_threads(1):
                yield lambda tasks: map(_score_chunk, tasks)
        finally:
            torch.set_num_threads(threads)
            cv2.setNumThreads(cv_threads)
        return
    # BLAS reads its thread count when numpy is imported, so it must be in the environment the
    # spawned workers start with, not set inside them. spawn, not fork: the parent may hold
    # torch/MLflow threads, which fork copies badly.
    saved = {key: os.environ.get(key) for key in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        pool = get_context("spawn").Pool(workers, initializer=_worker_init)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with pool:
        yield lambda tasks: pool.imap(_score_chunk, tasks)


@contextmanager
def _blas_threads(count: int) -> Iterator[None]:
    """Hold numpy's BLAS to `count` threads (threadpoolctl ships with scikit-learn, a dependency here)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=count, user_api="blas"):
        yield
