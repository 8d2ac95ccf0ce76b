"""Ingest: copy a source's raw files into tar shards and list them in a Parquet manifest.

Raw bytes are kept as they are (broken files too): curation decides what is usable and
records why, so nothing is dropped silently here. Shards make the raw dataset one movable,
versionable unit between KFP tasks and for DVC.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import IngestConfig
from components.ingest.sources import Source, parse_source
from components.progress import progress
from components.storage import ShardWriter, directory_hash, write_manifest

RAW_PREFIX = "raw"
SKIPPED = "skipped.parquet"  # files left out because an earlier dataset already holds them (reason code)
DUP_EXISTING = "dup_existing"
# sha256 of every file a model lineage has seen: the champion's known set plus what this run ingested.
# Retraining writes it next to the raw shards and curate logs it, so a retrained champion's known set
# still holds its ancestors' files (its own dataset only holds the new ones).
KNOWN_FILE = "known.parquet"


class NothingNewError(ValueError):
    """Every file of the source is already in the dataset retraining starts from."""


@dataclass(frozen=True)
class IngestResult:
    """What ingest produced: where, how many and the content hash."""

    directory: Path
    num_samples: int
    content_hash: str
    source: str


def sample_id(source_name: str, relative_path: str) -> str:
    """Stable sample id from where the file came from (not its bytes, so duplicates stay distinct)."""
    return "s" + hashlib.sha1(f"{source_name}\0{relative_path}".encode()).hexdigest()[:16]


def run(config: IngestConfig, output_dir: Path, source: Source | str | None = None,
        known_sha256: set[str] | None = None) -> IngestResult:
    """Ingest `source` (default: the recipe's) into `output_dir`: raw shards + manifest.parquet.

    With `known_sha256` (retraining), files whose bytes are already known are left out and listed
    in skipped.parquet with reason `dup_existing`; NothingNewError when no file is new.
    """
    if source is None or isinstance(source, str):
        source = parse_source(source or config.source)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    items = list(source.items())
    if config.max_samples is not None:
        items = items[: config.max_samples]
    if not items:
        raise ValueError(f"source {source.describe()} has no files to ingest")
    skipped = []
    with ShardWriter(output_dir, RAW_PREFIX, config.shard_size) as writer:
        for item in progress(items, description="ingest"):
            data = item.read()
            digest = hashlib.sha256(data).hexdigest()
            if known_sha256 is not None and digest in known_sha256:
                skipped.append({"source_path": item.source_path, "sha256": digest, "reason": DUP_EXISTING})
                continue
            caption = item.caption[: config.max_caption_chars] if item.caption is not None else None
            sid = sample_id(source.name, item.relative_path)
            meta = {
                "id": sid,
                "source_path": item.source_path,
                "relative_path": item.relative_path,
                "caption": caption,
                "caption_source": item.caption_source,
                "category": item.category,
            }
            shard = writer.write(sid, {"bin": data, "json": json.dumps(meta, sort_keys=True).encode()})
            rows.append({**meta, "sha256": digest, "bytes": len(data), "shard": shard})
    if known_sha256 is not None:
        pd.DataFrame(skipped, columns=["source_path", "sha256", "reason"]).to_parquet(output_dir / SKIPPED, index=False)
        if not rows:
            raise NothingNewError(f"nothing new to train on: all {len(skipped)} files of {source.describe()} are "
                                  "already in the datasets of the champion's lineage")
    write_manifest(pd.DataFrame(rows), output_dir)
    return IngestResult(output_dir, len(rows), directory_hash(output_dir), source.describe())


def new_stage(recipe, inputs, outputs, tracker, context, source: str = "", **_: object):
    """Tracking glue for retraining: ingest only files not in `inputs['known']/known.parquet`.

    Writes the lineage's new known set (the old one plus every file ingested now) as
    `known.parquet` in the raw dataset, for curate to log with the dataset it makes, and copies
    the champion's dedup reference there for curate to deduplicate against.
    """
    from components.curate.reference import FILES as REFERENCE_FILES
    from components.runner import StageOutput

    known = set(pd.read_parquet(Path(inputs["known"]) / KNOWN_FILE)["sha256"].astype(str))
    result = run(recipe.ingest, outputs["raw_dataset"], source or None, known_sha256=known)
    skipped = len(pd.read_parquet(result.directory / SKIPPED))
    seen = known | set(pd.read_parquet(result.directory / "manifest.parquet")["sha256"].astype(str))
    pd.DataFrame({"sha256": sorted(seen)}).to_parquet(result.directory / KNOWN_FILE, index=False)
    for name in REFERENCE_FILES:  # the lineage's dedup reference, for curate (components/curate/reference.py)
        if (Path(inputs["known"]) / name).is_file():
            shutil.copyfile(Path(inputs["known"]) / name, result.directory / name)
    tracker.set_tags({"dataset.source": result.source, "dataset.raw_sha256": result.content_hash})
    return StageOutput(metadata={"num_samples": result.num_samples, "skipped_known": skipped,
                                 "content_hash": result.content_hash, "source": result.source},
                       metrics={"ingest.samples": result.num_samples, "ingest.skipped_known": skipped},
                       artifacts=[result.directory / "manifest.parquet", result.directory / SKIPPED])


def stage(recipe, inputs, outputs, tracker, context, source: str = "", **_: object):
    """Tracking glue for the runner: ingest the recipe's (or the given) source into `outputs['raw_dataset']`."""
    from components.runner import StageOutput

    result = run(recipe.ingest, outputs["raw_dataset"], source or None)
    metadata = {"num_samples": result.num_samples, "content_hash": result.content_hash, "source": result.source}
    tracker.set_tags({"dataset.source": result.source, "dataset.raw_sha256": result.content_hash})
    return StageOutput(metadata=metadata, metrics={"ingest.samples": result.num_samples},
                       artifacts=[result.directory / "manifest.parquet"])
