"""Curation: every raw sample is accepted, rejected by a filter, or quarantined, with a reason.

Funnel (in order; each step's count is in the report):
  decode/validate -> resolution -> aspect ratio -> exact dedup (sha256) -> technical quality
Accepted samples are center-cropped to the recipe's resolution and written as WebDataset
shards per split (`train-*.tar`, `val-*.tar`: png + txt + json per sample). The split is a
hash of the sample id, so a sample stays in its split when the source grows.
Quarantine = the file itself is broken (cannot be decoded safely); reject = a valid image
that a filter removed. Both carry a reason code from `components.media.RejectReason`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import CurateConfig
from components.curate.report import write_report
from components.media import (
    DecodePolicy,
    RejectReason,
    center_crop_resize,
    check_geometry,
    decode_image,
    image_to_array,
    image_to_png_bytes,
    technical_quality,
)
from components.progress import progress
from components.storage import ShardWriter, directory_hash, iter_shards, read_manifest, shard_paths, write_manifest

FUNNEL = ["input", "decoded", "resolution", "aspect_ratio", "exact_dedup", "quality"]
# Which funnel step removes a sample with a given reason.
_STEP_OF_REASON = {
    RejectReason.TOO_SMALL: "resolution",
    RejectReason.BAD_ASPECT_RATIO: "aspect_ratio",
    RejectReason.EXACT_DUPLICATE: "exact_dedup",
    RejectReason.LOW_QUALITY: "quality",
}
REJECTS = "rejects.parquet"


@dataclass(frozen=True)
class CurateResult:
    """What curation produced."""

    directory: Path
    num_samples: int
    num_train: int
    num_val: int
    content_hash: str
    funnel: dict[str, int]
    reasons: dict[str, int]


def _split_of(sample_id: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def _process(task: tuple[dict[str, Any], bytes, CurateConfig]) -> dict[str, Any]:
    """Decode and score one sample (runs in a worker process; never raises for bad files)."""
    meta, data, config = task
    policy = DecodePolicy(
        allowed_formats=frozenset(config.allowed_formats),
        max_pixels=config.max_pixels,
        max_bytes=config.max_bytes,
        background=tuple(config.background),
    )
    decoded = decode_image(data, policy)
    row: dict[str, Any] = {
        "id": meta["id"],
        "format": decoded.format,
        "mode": decoded.mode,
        "width": decoded.width,
        "height": decoded.height,
        "repairs": ",".join(decoded.repairs),
    }
    if not decoded.ok:
        detail = f"{meta['source_path']}: {decoded.detail}"
        return {**row, "status": "quarantined", "reason": str(decoded.reason), "detail": detail}
    short, long = sorted(decoded.image.size)
    row["aspect_ratio"] = long / max(short, 1)
    geometry = check_geometry(*decoded.image.size, min_side=config.min_side, max_aspect_ratio=config.max_aspect_ratio)
    if geometry is RejectReason.TOO_SMALL:
        return {**row, "status": "rejected", "reason": str(geometry),
                "detail": f"shorter side {short}px < curate.min_side {config.min_side}px"}
    if geometry is RejectReason.BAD_ASPECT_RATIO:
        return {**row, "status": "rejected", "reason": str(geometry),
                "detail": f"aspect ratio {long / short:.2f} > curate.max_aspect_ratio {config.max_aspect_ratio}"}
    image = center_crop_resize(decoded.image, config.resolution)
    scores = technical_quality(image_to_array(image))
    return {**row, **scores, "status": "ok", "reason": None, "detail": None, "png": image_to_png_bytes(image)}


def _map(tasks: list, workers: int):
    if workers == 1:
        yield from map(_process, tasks)
        return
    # spawn, not fork: the parent may hold torch/MLflow threads, which fork copies badly.
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_process, tasks, chunksize=16)


def run(config: CurateConfig, raw_dir: Path, output_dir: Path) -> CurateResult:
    """Curate the raw dataset in `raw_dir` into `output_dir` (shards, manifests, report)."""
    raw_dir, output_dir = Path(raw_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    raw_manifest = read_manifest(raw_dir).set_index("id", drop=False)
    tasks = []
    for sample in iter_shards(shard_paths(raw_dir, "raw")):
        meta = json.loads(sample.members["json"])
        tasks.append((meta, sample.members.get("bin", b""), config))
    if len(tasks) != len(raw_manifest):
        raise ValueError(f"{raw_dir}: shards hold {len(tasks)} samples but the manifest lists {len(raw_manifest)}")
    workers = config.workers or os.cpu_count() or 1
    results = list(progress(_map(tasks, min(workers, max(1, len(tasks) // 64))), "curate", total=len(tasks)))

    seen_sha: dict[str, str] = {}
    accepted: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for result in results:
        raw = raw_manifest.loc[result["id"]]
        # Parquet turns missing captions/categories into NaN; keep them as None.
        base = {k: (None if pd.isna(raw[k]) else raw[k])
                for k in ("id", "source_path", "caption", "caption_source", "category", "sha256", "bytes")}
        row = {**base, **result}
        if row["status"] == "ok":
            first = seen_sha.get(row["sha256"])
            if first is not None:
                row.update(status="rejected", reason=str(RejectReason.EXACT_DUPLICATE),
                           detail=f"same bytes (sha256) as sample {first}")
            elif row["quality"] < config.min_quality:
                row.update(status="rejected", reason=str(RejectReason.LOW_QUALITY),
                           detail=f"quality {row['quality']:.3f} < curate.min_quality {config.min_quality}")
            else:
                seen_sha[row["sha256"]] = row["id"]
        (accepted if row["status"] == "ok" else removed).append(row)

    writers = {split: ShardWriter(output_dir, split, config.shard_size) for split in ("train", "val")}
    for row in accepted:
        row["split"] = _split_of(row["id"], config.val_fraction)
        caption = row["caption"] or ""
        meta = {k: row[k] for k in ("id", "caption", "caption_source", "category", "quality")}
        row["shard"] = writers[row["split"]].write(
            row["id"], {"png": row.pop("png"), "txt": caption.encode(), "json": json.dumps(meta).encode()}
        )
        row["out_width"] = row["out_height"] = config.resolution
    for writer in writers.values():
        writer.close()

    manifest = pd.DataFrame(accepted)
    for row in removed:
        row.pop("png", None)
    rejects = pd.DataFrame(removed, columns=sorted({k for r in removed for k in r} | {"id", "status", "reason", "detail"}))
    write_manifest(manifest, output_dir)
    write_manifest(rejects, output_dir, REJECTS)

    reasons = Counter(r["reason"] for r in removed)
    funnel = {"input": len(tasks)}
    remaining = len(tasks) - sum(1 for r in removed if r["status"] == "quarantined")
    funnel["decoded"] = remaining
    for step in FUNNEL[2:]:
        remaining -= sum(n for reason, n in reasons.items() if _STEP_OF_REASON.get(RejectReason(reason)) == step)
        funnel[step] = remaining
    assert remaining == len(accepted), "funnel does not add up"
    content_hash = directory_hash(output_dir)
    summary = {
        "input": len(tasks),
        "accepted": len(accepted),
        "rejected": sum(1 for r in removed if r["status"] == "rejected"),
        "quarantined": sum(1 for r in removed if r["status"] == "quarantined"),
        "train": int((manifest["split"] == "train").sum()) if len(manifest) else 0,
        "val": int((manifest["split"] == "val").sum()) if len(manifest) else 0,
        "funnel": funnel,
        "reasons": dict(sorted(reasons.items())),
        "content_hash": content_hash,
        "resolution": config.resolution,
    }
    write_report(output_dir, summary, manifest, rejects)
    if not accepted:
        raise ValueError(f"curation accepted no samples out of {len(tasks)}; see {output_dir / 'report.html'}")
    return CurateResult(output_dir, len(accepted), summary["train"], summary["val"], content_hash, funnel, summary["reasons"])


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: curate `inputs['raw_dataset']` into `outputs['dataset']`."""
    from components.runner import StageOutput

    result = run(recipe.curate, inputs["raw_dataset"], outputs["dataset"])
    metrics = {f"curate.funnel.{k}": v for k, v in result.funnel.items()}
    metrics.update({f"curate.reason.{k}": v for k, v in result.reasons.items()})
    metrics.update({"curate.accepted": result.num_samples, "curate.train": result.num_train, "curate.val": result.num_val})
    metadata = {"num_samples": result.num_samples, "num_train": result.num_train, "num_val": result.num_val,
                "content_hash": result.content_hash, "resolution": recipe.curate.resolution}
    tracker.set_tags({"dataset.sha256": result.content_hash})
    out = result.directory
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[out / "report.json", out / "report.html", out / "manifest.parquet", out / REJECTS])
