"""Curation, phase 2: the global merge over all scored shards.

Everything that needs every sample at once happens here: exact, perceptual and semantic dedup
(global across shards), the score thresholds from the recipe, human review labels, the
train/val split, concept clusters with balancing weights, and writing the final dataset.

Funnel, in order (a sample is removed by the first step it fails; `step`, `reason` and
`detail` in rejects.parquet say which and with what score, and every score column is kept):

  decoded -> video rules -> resolution -> aspect_ratio -> quality -> sharpness -> exposure
  -> brisque -> text -> safety -> caption -> alignment -> aesthetic -> human_review
  -> exact_dedup -> near_dedup -> semantic_dedup

Dedup runs last, on samples that passed every per-sample check, so a kept representative is
never removed later (its duplicates would be lost with it); within a duplicate group the
sample with the best technical quality is kept (ties: input order). In retraining, near and
semantic dedup also compare with the champion lineage's samples (`reference.py`), whose copy
always wins: the detail then names the earlier dataset's sample.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.config import CurateConfig
from components.curate.reference import Reference
from components.curate.shard import EMBEDDINGS, SAMPLES, SCORES
from components.media import RejectReason
from components.storage import ShardWriter, iter_shard, shard_paths, write_manifest

MANIFEST_EMBEDDINGS = "embeddings.npy"  # float32 [n_accepted, D], row i = manifest row i
REJECTS = "rejects.parquet"

# Funnel step -> the reason codes it removes with.
STEPS: dict[str, tuple[RejectReason, ...]] = {
    "decoded": (RejectReason.EMPTY_FILE, RejectReason.UNREADABLE, RejectReason.UNSUPPORTED_FORMAT,
                RejectReason.TRUNCATED, RejectReason.DECOMPRESSION_BOMB, RejectReason.FILE_TOO_LARGE,
                RejectReason.ANIMATED),
    "video": (RejectReason.LOW_FPS, RejectReason.TOO_SHORT, RejectReason.STATIC, RejectReason.JITTERY),
    "resolution": (RejectReason.TOO_SMALL,),
    "aspect_ratio": (RejectReason.BAD_ASPECT_RATIO,),
    "quality": (RejectReason.LOW_QUALITY,),
    "sharpness": (RejectReason.BLURRY,),
    "exposure": (RejectReason.BAD_EXPOSURE,),
    "brisque": (RejectReason.POOR_PERCEPTUAL_QUALITY,),
    "text": (RejectReason.TOO_MUCH_TEXT,),
    "safety": (RejectReason.UNSAFE,),
    "caption": (RejectReason.NO_CAPTION,),
    "alignment": (RejectReason.LOW_ALIGNMENT,),
    "aesthetic": (RejectReason.LOW_AESTHETIC,),
    "human_review": (RejectReason.HUMAN_REJECTED,),
    "exact_dedup": (RejectReason.EXACT_DUPLICATE,),
    "near_dedup": (RejectReason.NEAR_DUPLICATE,),
    "semantic_dedup": (RejectReason.SEMANTIC_DUPLICATE,),
}
STEP_OF_REASON = {str(reason): step for step, reasons in STEPS.items() for reason in reasons}


@dataclass(frozen=True)
class ThresholdFilter:
    """A score threshold from the recipe: samples on the wrong side are removed with `reason`."""

    step: str
    column: str
    key: str  # field of curate.filters
    keep_above: bool  # True: keep score >= threshold; False: keep score <= threshold
    reason: RejectReason
    off: float  # the threshold value that filters nothing


THRESHOLDS = [
    ThresholdFilter("quality", "quality", "min_quality", True, RejectReason.LOW_QUALITY, 0.0),
    ThresholdFilter("sharpness", "sharpness", "min_sharpness", True, RejectReason.BLURRY, 0.0),
    ThresholdFilter("exposure", "clipped", "max_clipped", False, RejectReason.BAD_EXPOSURE, 1.0),
    ThresholdFilter("brisque", "brisque", "max_brisque", False, RejectReason.POOR_PERCEPTUAL_QUALITY, 150.0),
    ThresholdFilter("text", "text_area", "max_text_area", False, RejectReason.TOO_MUCH_TEXT, 1.0),
    ThresholdFilter("safety", "unsafe", "max_unsafe", False, RejectReason.UNSAFE, 1.0),
]
_LATE_THRESHOLDS = [
    ThresholdFilter("alignment", "alignment", "min_alignment", True, RejectReason.LOW_ALIGNMENT, 0.0),
    ThresholdFilter("aesthetic", "aesthetic", "min_aesthetic", True, RejectReason.LOW_AESTHETIC, 0.0),
]
ALL_THRESHOLDS = THRESHOLDS + _LATE_THRESHOLDS


@dataclass(frozen=True)
class MergeResult:
    """What the merge wrote and the numbers behind the report."""

    directory: Path
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    funnel: dict[str, int]
    reasons: dict[str, int]
    inputs: int


def split_of(group_id: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the id (a video's clips share their video's split)."""
    bucket = int(hashlib.sha256(group_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def shard_prefix(split: str, media: str, bucket: str) -> str:
    """Output shard prefix: split, media kind and bucket, e.g. 'train-image-4x3'."""
    return f"{split}-{media}-{bucket.replace(':', 'x')}"


def _load(scored_dirs: list[Path]) -> tuple[pd.DataFrame, np.ndarray]:
    frames, embeddings, offset = [], [], 0
    for index, directory in enumerate(scored_dirs):
        frame = pd.read_parquet(directory / SCORES)
        frame["scored_shard"] = index
        emb = np.load(directory / EMBEDDINGS, allow_pickle=False)
        if "embedding_row" in frame:
            frame["embedding_row"] = np.where(frame["embedding_row"] >= 0, frame["embedding_row"] + offset, -1)
        if emb.size:
            embeddings.append(emb)
            offset += len(emb)
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
    return rows, matrix


def _remove(rows: pd.DataFrame, mask: pd.Series | np.ndarray | pd.Index, reason: RejectReason,
            details: list[str] | pd.Series) -> None:
    """Reject the rows selected by `mask` (a boolean mask, or index labels in the order of `details`)."""
    rows.loc[mask, "status"] = "rejected"
    rows.loc[mask, "reason"] = str(reason)
    rows.loc[mask, "detail"] = list(details) if not isinstance(details, pd.Series) else details.values


def _apply_threshold(rows: pd.DataFrame, rule: ThresholdFilter, config: CurateConfig) -> None:
    threshold = getattr(config.filters, rule.key)
    if threshold == rule.off or rule.column not in rows:
        return
    live = rows["status"] == "ok"
    values = rows[rule.column]
    # NaN means the scorer could not measure this sample (documented per scorer): it passes.
    failed = live & values.notna() & ((values < threshold) if rule.keep_above else (values > threshold))
    if rule.column == "alignment" and "caption_source" in rows:
        failed &= rows["caption_source"] != "tagger"  # a tagger caption is aligned by construction
    op = "<" if rule.keep_above else ">"
    details = [f"{rule.column} {v:.3f} {op} curate.filters.{rule.key} {threshold}" for v in values[failed]]
    _remove(rows, failed, rule.reason, details)


def _quality_order(rows: pd.DataFrame, index: pd.Index) -> pd.Index:
    """`index` sorted best-first (technical quality, then input order) so dedup keeps the best copy."""
    if "quality" not in rows:
        return index
    frame = rows.loc[index, ["quality"]].assign(order=np.arange(len(index)))
    return frame.sort_values(["quality", "order"], ascending=[False, True], na_position="last").index


def _drop_duplicates(rows: pd.DataFrame, order: pd.Index, groups: Any, reason: RejectReason, describe: Any,
                     reference_ids: np.ndarray | None = None) -> None:
    """Reject the dropped items of a dedup result over `order`; `describe(score, kept)` words the detail.

    With `reference_ids`, the dedup ran over the reference's items first and then `order`'s
    (greedy first-wins keeps the earlier dataset's copy); only `order`'s items can be removed.
    """
    labels = [f"sample {i} of an earlier dataset (the champion's lineage)" for i in
              (reference_ids if reference_ids is not None else [])]
    labels += [f"kept sample {i}" for i in rows.loc[order, "id"].to_numpy()]
    skip = len(labels) - len(order)
    dup = np.flatnonzero(~groups.kept[skip:])
    if not len(dup):
        return
    details = [describe(groups.score[skip + i], labels[groups.representative[skip + i]]) for i in dup]
    # Label indexing in `dup` order: the details are in quality order, not in row order.
    _remove(rows, order[dup], reason, details)


def _exact_dedup(rows: pd.DataFrame) -> None:
    from components.curate.dedup import exact_duplicates

    order = _quality_order(rows, rows.index[rows["status"] == "ok"])
    if len(order) < 2:
        return
    keys = rows.loc[order, "sha256"].astype(str)
    if "clip_start_s" in rows:  # clips of one video share its sha256; each clip is its own sample
        keys = keys + "@" + rows.loc[order, "clip_start_s"].fillna(-1).astype(str)
    _drop_duplicates(rows, order, exact_duplicates(keys.to_numpy()), RejectReason.EXACT_DUPLICATE,
                     lambda score, kept: f"same bytes (sha256) as kept sample {kept}")


def _near_dedup(rows: pd.DataFrame, config: CurateConfig, reference: Reference) -> None:
    from components.curate.dedup import near_duplicate_groups

    if not config.dedup.perceptual or "phash" not in rows:
        return
    order = _quality_order(rows, rows.index[(rows["status"] == "ok") & rows["phash"].notna()])
    earlier = reference.rows[reference.rows["phash"].notna()]
    if not len(order) or len(order) + len(earlier) < 2:
        return
    hashes = np.concatenate([earlier["phash"].astype(np.int64).to_numpy(),
                             rows.loc[order, "phash"].astype(np.int64).to_numpy()]).view(np.uint64)
    dedup = config.dedup
    _drop_duplicates(rows, order, near_duplicate_groups(hashes, dedup.max_hamming), RejectReason.NEAR_DUPLICATE,
                     lambda score, kept: f"{dedup.hash} {int(score)} bits from {kept} "
                                         f"(curate.dedup.max_hamming {dedup.max_hamming})",
                     earlier["id"].to_numpy())


def _semantic_dedup(rows: pd.DataFrame, embeddings: np.ndarray, config: CurateConfig, reference: Reference) -> None:
    from components.curate.dedup import semantic_duplicates

    if not config.dedup.semantic or not embeddings.size:
        return
    order = _quality_order(rows, rows.index[(rows["status"] == "ok") & (rows["embedding_row"] >= 0)])
    earlier = reference.rows[reference.rows["embedding_row"] >= 0]
    if len(earlier) and reference.embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(f"the dedup reference's embeddings are {reference.embeddings.shape[1]}-d but this run's are "
                         f"{embeddings.shape[1]}-d: the champion's dataset was curated with another embedding model")
    if not len(order) or len(order) + len(earlier) < 2:
        return
    threshold = config.dedup.semantic_threshold
    vectors = embeddings[rows.loc[order, "embedding_row"].to_numpy()]
    if len(earlier):
        vectors = np.concatenate([reference.embeddings[earlier["embedding_row"].to_numpy()], vectors])
    _drop_duplicates(rows, order, semantic_duplicates(vectors, threshold), RejectReason.SEMANTIC_DUPLICATE,
                     lambda score, kept: f"cosine {float(score):.3f} to {kept} "
                                         f"(curate.dedup.semantic_threshold {threshold})",
                     earlier["id"].to_numpy())


def _captions(rows: pd.DataFrame) -> None:
    missing = (rows["status"] == "ok") & (rows["caption"].isna() | (rows["caption"].astype(str).str.len() == 0))
    _remove(rows, missing, RejectReason.NO_CAPTION, ["no usable caption after cleanup, and the tagger gave none (curate.captions.tagger)"] * int(missing.sum()))


def _human_review(rows: pd.DataFrame, labels: dict[str, str]) -> None:
    rows["human_label"] = rows["id"].map(labels).astype(object)
    rejected = (rows["status"] == "ok") & (rows["human_label"] == "reject")
    _remove(rows, rejected, RejectReason.HUMAN_REJECTED, ["labelled reject in review"] * int(rejected.sum()))


def decide(rows: pd.DataFrame, embeddings: np.ndarray, config: CurateConfig, labels: dict[str, str],
           reference: Reference | None = None) -> pd.DataFrame:
    """Apply the global funnel to the scored rows (status/reason/detail/step updated); returns them.

    With a `reference` (retraining), near and semantic dedup also remove samples that duplicate a
    sample of the earlier dataset it stands for.
    """
    reference = reference if reference is not None else Reference.empty()
    rows = rows.copy()
    for column in ("reason", "detail"):
        rows[column] = rows[column].astype(object) if column in rows else None
    if "embedding_row" not in rows:
        rows["embedding_row"] = -1
    for rule in THRESHOLDS:
        _apply_threshold(rows, rule, config)
    _captions(rows)
    for rule in _LATE_THRESHOLDS:
        _apply_threshold(rows, rule, config)
    _human_review(rows, labels)
    _exact_dedup(rows)
    _near_dedup(rows, config, reference)
    _semantic_dedup(rows, embeddings, config, reference)
    rows["step"] = rows["reason"].map(lambda r: STEP_OF_REASON.get(r) if isinstance(r, str) else None)
    return rows


def funnel_counts(rows: pd.DataFrame, inputs: int) -> dict[str, int]:
    """Samples left after each funnel step (samples = images + video clips; see the report)."""
    counts = Counter(rows.loc[rows["status"] != "ok", "step"])
    funnel = {"input": inputs, "samples": len(rows)}
    remaining = len(rows)
    for step in STEPS:
        remaining -= counts.get(step, 0)
        funnel[step] = remaining
    return funnel


def _assign_clusters(accepted: pd.DataFrame, embeddings: np.ndarray, config: CurateConfig) -> None:
    from components.curate.balance import balance_weights, cluster_embeddings

    rows = accepted["embedding_row"].to_numpy()
    if not config.balance.enabled or not embeddings.size or (rows < 0).any() or len(accepted) < 2:
        accepted["cluster"] = 0
        accepted["sample_weight"] = 1.0
        return
    clusters = cluster_embeddings(embeddings[rows], config.balance.clusters)
    accepted["cluster"] = clusters
    accepted["sample_weight"] = balance_weights(clusters)


def merge(config: CurateConfig, scored_dirs: list[Path], output_dir: Path, inputs: int,
          labels: dict[str, str] | None = None, reference: Reference | None = None) -> MergeResult:
    """Decide every sample's fate across all scored shards and write the curated dataset to `output_dir`.

    `reference`: an earlier dataset's samples that new ones must not duplicate (retraining).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob("*.tar"), *(output_dir / name for name in (MANIFEST_EMBEDDINGS, REJECTS,
                                                                          "manifest.parquet", "report.json",
                                                                          "report.html"))]:
        stale.unlink(missing_ok=True)  # a previous run's outputs must not mix into this one (or its hash)
    rows, embeddings = _load(scored_dirs)
    if rows.empty:
        raise ValueError("curation got no samples: the raw dataset is empty")
    rows = decide(rows, embeddings, config, labels or {}, reference)
    accepted = rows[rows["status"] == "ok"].copy()
    removed = rows[rows["status"] != "ok"].copy()
    accepted["split"] = [split_of(str(p), config.val_fraction) for p in accepted["parent_id"]]
    _assign_clusters(accepted, embeddings, config)

    # Write the accepted samples, grouped by split / media / bucket, in input order.
    wanted = dict(zip(accepted["id"], zip(accepted["split"], accepted["media"], accepted["bucket"])))
    writers: dict[str, ShardWriter] = {}
    shard_of: dict[str, str] = {}
    with ExitStack() as closing:
        for directory in scored_dirs:
            for path in shard_paths(directory, SAMPLES):
                for sample in iter_shard(path):
                    if sample.key not in wanted:
                        continue
                    prefix = shard_prefix(*wanted[sample.key])
                    if prefix not in writers:
                        writers[prefix] = closing.enter_context(ShardWriter(output_dir, prefix, config.shard_size))
                    shard_of[sample.key] = writers[prefix].write(sample.key, sample.members)
    accepted["shard"] = accepted["id"].map(shard_of)
    if accepted["shard"].isna().any():
        missing = accepted.loc[accepted["shard"].isna(), "id"].tolist()[:5]
        raise RuntimeError(f"scored shards lack the media of accepted samples {missing}; re-run curation")

    order = accepted["embedding_row"].to_numpy()
    if embeddings.size and (order >= 0).all():
        np.save(output_dir / MANIFEST_EMBEDDINGS, embeddings[order].astype(np.float32))
    manifest = accepted.drop(columns=["scored_shard", "embedding_row", "status", "reason", "detail", "step"])
    rejects = removed.drop(columns=["scored_shard", "embedding_row"])
    write_manifest(manifest.reset_index(drop=True), output_dir)
    write_manifest(rejects.reset_index(drop=True), output_dir, REJECTS)
    reasons = dict(sorted(Counter(removed["reason"]).items()))
    return MergeResult(output_dir, manifest.reset_index(drop=True), rejects.reset_index(drop=True),
                       funnel_counts(rows, inputs), reasons, inputs)


def samples_for_report(scored_dirs: list[Path], ids: set[str]) -> dict[str, bytes]:
    """PNG bytes of the given samples (rejected ones too) from the scored shards, for report grids."""
    found: dict[str, bytes] = {}
    for directory in scored_dirs:
        for path in shard_paths(directory, SAMPLES):
            for sample in iter_shard(path):
                if sample.key in ids and "png" in sample.members:
                    found[sample.key] = sample.members["png"]
    return found


def summary_of(result: MergeResult, config: CurateConfig, content_hash: str, skipped_shards: int) -> dict[str, Any]:
    """The machine-readable report (report.json)."""
    manifest, rejects = result.manifest, result.rejects
    score_stats = {}
    for rule in ALL_THRESHOLDS:
        if rule.column in manifest or rule.column in rejects:
            values = pd.concat([manifest.get(rule.column, pd.Series(dtype=float)),
                                rejects.get(rule.column, pd.Series(dtype=float))]).dropna()
            if len(values):
                score_stats[rule.column] = {"min": float(values.min()), "median": float(values.median()),
                                            "max": float(values.max()), "threshold": getattr(config.filters, rule.key),
                                            "filter_on": getattr(config.filters, rule.key) != rule.off}
    count = lambda frame, col, value: int((frame[col] == value).sum()) if col in frame and len(frame) else 0  # noqa: E731
    return {
        "input": result.inputs,
        "samples": len(manifest) + len(rejects),
        "accepted": len(manifest),
        "rejected": count(rejects, "status", "rejected"),
        "quarantined": count(rejects, "status", "quarantined"),
        "train": count(manifest, "split", "train"),
        "val": count(manifest, "split", "val"),
        "images": count(manifest, "media", "image"),
        "clips": count(manifest, "media", "video"),
        "buckets": {str(k): int(v) for k, v in manifest["bucket"].value_counts().sort_index().items()} if len(manifest) else {},
        "clusters": int(manifest["cluster"].nunique()) if "cluster" in manifest and len(manifest) else 0,
        "captions_by_source": {str(k): int(v) for k, v in manifest["caption_source"].value_counts().items()} if len(manifest) else {},
        "funnel": result.funnel,
        "reasons": result.reasons,
        "scores": score_stats,
        "content_hash": content_hash,
        "resolution": config.resolution,
        "resumed_shards": skipped_shards,
        "balance_effective_clusters": _effective_clusters(manifest),
    }


def _effective_clusters(manifest: pd.DataFrame) -> float:
    """exp(entropy) of the cluster distribution after weighting (more = more balanced)."""
    if "cluster" not in manifest or not len(manifest):
        return 0.0
    mass = manifest.groupby("cluster")["sample_weight"].sum().to_numpy()
    p = mass / mass.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def write_json(path: Path, value: Any) -> None:
    """JSON with stable formatting."""
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
