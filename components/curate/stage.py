"""Curation: every raw sample is accepted, rejected by a filter, or quarantined, with a reason.

Two phases, so that the same code runs on a laptop and as a KFP ParallelFor on a cluster:

1. `components.curate.shard`: per raw shard, decode/validate, cut videos into clips, crop to
   aspect-ratio buckets, clean captions, hash and score (OCR, safety, BRISQUE, features,
   alignment, aesthetic...). Shards are independent; finished ones are kept in a work
   directory keyed by content, so a re-run after a crash (or after changing only a threshold)
   skips them.
2. `components.curate.merge`: global dedup, thresholds, review labels, split, concept
   balancing; writes WebDataset shards grouped by split/media/bucket, `manifest.parquet`
   (every score), `rejects.parquet` (reason, detail and step for every removed sample),
   `embeddings.npy`, `report.json` and `report.html`.

Quarantine = the file itself is broken (cannot be decoded safely); reject = a valid sample
that a filter removed. Both carry a reason code from `components.media.RejectReason`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.config import CurateConfig
from components.curate.merge import MANIFEST_EMBEDDINGS, REJECTS, MergeResult, merge, samples_for_report, summary_of
from components.curate.reference import Reference
from components.curate.report import write_report
from components.curate.shard import DONE, ShardJob, score_shards, shard_key
from components.progress import ProgressCounter
from components.storage import directory_hash, read_manifest, shard_paths

WORK_ENV = "REELFORGE_CACHE_DIR"  # when set, scored shards live under <it>/curate-shards (shared, resumable)


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
    summary: dict[str, Any]
    reference: Reference | None = None  # the earlier datasets it was deduplicated against (retraining)


def raw_rows_by_shard(raw_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The raw manifest grouped by shard file name, rows keyed by id (NaN captions become None)."""
    manifest = read_manifest(raw_dir)
    grouped: dict[str, dict[str, dict[str, Any]]] = {}
    for record in manifest.to_dict("records"):
        clean = {k: (None if not isinstance(v, (list, tuple, str)) and pd.isna(v) else v) for k, v in record.items()}
        grouped.setdefault(str(record["shard"]), {})[str(record["id"])] = clean
    return grouped


def work_root(output_dir: Path) -> Path:
    """Where scored shards are kept between runs (the cache dir when configured, else beside the output)."""
    if os.environ.get(WORK_ENV):
        return Path(os.environ[WORK_ENV]) / "curate-shards"
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.curate-work"


def shard_jobs(config: CurateConfig, raw_dir: Path, root: Path, only: list[str] | None = None) -> list[ShardJob]:
    """One job per raw shard (or per name in `only`), each with its content-keyed scored directory."""
    grouped = raw_rows_by_shard(raw_dir)
    paths = shard_paths(raw_dir, "raw")
    listed = {p.name for p in paths}
    unknown = set(grouped) - listed
    if unknown:
        raise ValueError(f"{raw_dir}: the manifest names shards that are missing: {sorted(unknown)[:5]}")
    if only is not None:
        missing = set(only) - listed
        if missing:
            raise ValueError(f"{raw_dir}: no raw shard named {sorted(missing)}; have {sorted(listed)}")
        paths = [p for p in paths if p.name in only]
    return [ShardJob(p, Path(root) / shard_key(config, p), grouped.get(p.name, {})) for p in paths]


def _workers(config: CurateConfig, items: int) -> int:
    workers = config.workers or os.cpu_count() or 1
    # Each worker loads the scoring models (~seconds); below ~2 chunks per worker it does not pay.
    return max(1, min(workers, items // max(1, 2 * config.batch_size)))


def score(config: CurateConfig, raw_dir: Path, root: Path, only: list[str] | None = None) -> tuple[list[ShardJob], int]:
    """Phase 1 for the raw shards of `raw_dir` (all, or the names in `only`); returns the jobs and how many were resumed."""
    jobs = shard_jobs(config, raw_dir, root, only)
    total = sum(len(job.raw_rows) for job in jobs)
    bar = ProgressCounter("curate: score", total)
    skipped = score_shards(config, jobs, _workers(config, total), on_progress=bar.advance)
    bar.close()
    return jobs, skipped


def finish(config: CurateConfig, scored_dirs: list[Path], output_dir: Path, inputs: int, skipped: int,
           reference: Reference | None = None) -> CurateResult:
    """Phase 2 + report: merge the scored shards into the curated dataset in `output_dir`.

    `reference`: the earlier datasets' samples new ones must not duplicate (retraining).
    """
    from components.curate.aesthetic import review_labels

    output_dir = Path(output_dir)
    result: MergeResult = merge(config, scored_dirs, output_dir, inputs, review_labels(config.aesthetic), reference)
    content_hash = directory_hash(output_dir)
    summary = summary_of(result, config, content_hash, skipped)
    # Only the samples the report shows (a grid per bucket and per reason), not the whole dataset.
    thumbnail_ids = set(result.manifest.groupby(["media", "bucket"]).head(48)["id"]) if len(result.manifest) else set()
    if len(result.rejects):
        thumbnail_ids |= set(result.rejects.groupby("reason").head(24)["id"])
    write_report(output_dir, summary, result.manifest, result.rejects, samples_for_report(scored_dirs, thumbnail_ids))
    if not len(result.manifest):
        raise ValueError(f"curation accepted no samples out of {inputs}; see {output_dir / 'report.html'}")
    return CurateResult(output_dir, summary["accepted"], summary["train"], summary["val"], content_hash,
                        result.funnel, result.reasons, summary, reference)


def run(config: CurateConfig, raw_dir: Path, output_dir: Path) -> CurateResult:
    """Curate the raw dataset in `raw_dir` into `output_dir` (both phases; resumes finished shards)."""
    raw_dir, output_dir = Path(raw_dir), Path(output_dir)
    root = work_root(output_dir)
    jobs, skipped = score(config, raw_dir, root)
    inputs = sum(len(job.raw_rows) for job in jobs)
    result = finish(config, [job.out_dir for job in jobs], output_dir, inputs, skipped, Reference.load(raw_dir))
    if not os.environ.get(WORK_ENV):
        shutil.rmtree(root, ignore_errors=True)  # a private work dir has served its purpose
    return result


def _stage_output(recipe, result: CurateResult, tracker, raw_dir: Path):
    from components.ingest.stage import KNOWN_FILE
    from components.runner import StageOutput

    metrics = {f"curate.funnel.{k}": v for k, v in result.funnel.items()}
    metrics.update({f"curate.reason.{k}": v for k, v in result.reasons.items()})
    metrics.update({"curate.accepted": result.num_samples, "curate.train": result.num_train, "curate.val": result.num_val,
                    "curate.clusters": result.summary["clusters"],
                    "curate.balance_effective_clusters": result.summary["balance_effective_clusters"],
                    "curate.resumed_shards": result.summary["resumed_shards"]})
    metadata = {"num_samples": result.num_samples, "num_train": result.num_train, "num_val": result.num_val,
                "content_hash": result.content_hash, "resolution": recipe.curate.resolution}
    tracker.set_tags({"dataset.sha256": result.content_hash})
    out = result.directory
    # What the next retraining from a model trained on this dataset must not take again, logged
    # with the dataset: the lineage's known files (a retraining's raw dataset carries them) and
    # the dedup reference (the one this run started from plus the samples it accepted).
    lineage = [path for path in [Path(raw_dir) / KNOWN_FILE] if path.is_file()]
    manifest_embeddings = out / MANIFEST_EMBEDDINGS
    accepted = Reference.of_dataset(read_manifest(out), np.load(manifest_embeddings, allow_pickle=False)
                                    if manifest_embeddings.is_file() else None)
    reference = (result.reference or Reference.empty()).union(accepted)
    with tempfile.TemporaryDirectory() as scratch:
        for path in reference.save(Path(scratch)):
            tracker.log_artifact(path)
    metrics["curate.dedup_reference_samples"] = len(reference)
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[out / "report.json", out / "report.html", out / "manifest.parquet", out / REJECTS,
                                  *lineage])


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: curate `inputs['raw_dataset']` into `outputs['dataset']`."""
    return _stage_output(recipe, run(recipe.curate, inputs["raw_dataset"], outputs["dataset"]), tracker,
                         inputs["raw_dataset"])


def shard_stage(recipe, inputs, outputs, tracker, context, shard: str = "", **_: object):
    """Runner glue for one ParallelFor branch: score raw shard `shard` into `outputs['scored']`."""
    from components.runner import StageOutput

    out = Path(outputs["scored"])
    # With REELFORGE_CACHE_DIR on a persistent volume, a retried or re-run task finds its shard scored.
    private = not os.environ.get(WORK_ENV)
    root = out.parent / (out.name + ".work") if private else work_root(out)
    jobs, skipped = score(recipe.curate, inputs["raw_dataset"], root, only=[shard])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(jobs[0].out_dir, out)
    if private:
        shutil.rmtree(root, ignore_errors=True)
    return StageOutput(metadata={"shard": shard, "items": len(jobs[0].raw_rows)},
                       metrics={"curate_shard.items": len(jobs[0].raw_rows)})


def merge_stage(recipe, inputs, outputs, tracker, context, scored: list[str] | None = None, **_: object):
    """Runner glue for the global merge after the ParallelFor: `scored` lists the scored shard directories."""
    raw_dir = Path(inputs["raw_dataset"])
    return _stage_output(recipe, finish(recipe.curate, ordered_scored_dirs(raw_dir, scored or []),
                                        outputs["dataset"], len(read_manifest(raw_dir)), 0, Reference.load(raw_dir)),
                         tracker, raw_dir)


def ordered_scored_dirs(raw_dir: Path, scored: list[str]) -> list[Path]:
    """The scored shard directories in raw-shard order, checked to cover every raw shard exactly once.

    KFP collects a loop's outputs in no promised order; the merge's result (which exact copy is
    kept, the output shard order, the content hash) must not depend on it.
    """
    by_shard: dict[str, Path] = {}
    for path in map(Path, scored):
        done = path / DONE
        if not done.is_file():
            raise ValueError(f"{path} is not a finished scored shard ({DONE} is missing)")
        name = json.loads(done.read_text(encoding="utf-8"))["raw_shard"]
        if name in by_shard:
            raise ValueError(f"raw shard {name} was scored twice: {by_shard[name]} and {path}")
        by_shard[name] = path
    expected = [p.name for p in shard_paths(raw_dir, "raw")]
    if sorted(by_shard) != sorted(expected):
        missing, extra = sorted(set(expected) - set(by_shard)), sorted(set(by_shard) - set(expected))
        raise ValueError(f"scored shards do not match {raw_dir}: missing {missing[:5]}, unexpected {extra[:5]}")
    return [by_shard[name] for name in expected]
