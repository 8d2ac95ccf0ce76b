"""Ingest + curate on a source with broken files: nothing crashes, nothing is lost, every drop has a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components import tracking
from components.config import load_recipe
from components.curate.stage import run as curate
from components.ingest.stage import run as ingest
from components.runner import execute
from components.storage import iter_shards, read_manifest, shard_paths


def _recipe():
    return load_recipe("tiny", {"ingest.max_samples": None, "curate.min_side": 16, "curate.workers": 2})


def test_bad_files_are_quarantined_with_reasons_and_counts_add_up(image_folder, tmp_path: Path) -> None:
    source, expected = image_folder
    recipe = _recipe()
    raw = ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    total = expected["good"] + expected["quarantined"] + expected["too_small"] + expected["exact_duplicate"]
    assert raw.num_samples == total
    result = curate(recipe.curate, tmp_path / "raw", tmp_path / "curated")

    manifest = read_manifest(tmp_path / "curated")
    rejects = pd.read_parquet(tmp_path / "curated" / "rejects.parquet")
    assert len(manifest) == expected["good"] == result.num_samples
    assert len(manifest) + len(rejects) == total
    assert rejects["reason"].notna().all() and rejects["detail"].notna().all()
    by_name = {Path(p).name: r for p, r in zip(rejects["source_path"], rejects["reason"])}
    assert by_name == {"zero.png": "empty_file", "corrupt.png": "truncated", "notes.png": "unreadable",
                       "tiny.png": "too_small", "red_copy.png": "exact_duplicate"}
    quarantined = rejects[rejects["status"] == "quarantined"]
    assert set(quarantined["reason"]) == {"empty_file", "truncated", "unreadable"}
    assert all("corrupt.png" in d for d in rejects.loc[rejects["reason"] == "truncated", "detail"])

    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert list(report["funnel"]) == ["input", "decoded", "resolution", "aspect_ratio", "exact_dedup", "quality"]
    assert report["funnel"]["input"] == total and report["funnel"]["quality"] == expected["good"]
    assert report["accepted"] + report["rejected"] + report["quarantined"] == total
    html = (tmp_path / "curated" / "report.html").read_text()
    assert "truncated" in html and "Funnel" in html

    samples = list(iter_shards(shard_paths(tmp_path / "curated", "train") + shard_paths(tmp_path / "curated", "val")))
    assert sorted(s.key for s in samples) == sorted(manifest["id"])
    first = samples[0]
    assert set(first.members) == {"png", "txt", "json"}
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(first.members["png"])).size == (recipe.curate.resolution,) * 2
    assert set(manifest["split"]) <= {"train", "val"}
    uncaptioned = manifest[manifest["source_path"].str.endswith("uncaptioned.png")].iloc[0]
    assert uncaptioned["caption_source"] == "none" and pd.isna(uncaptioned["caption"])
    assert {"sha256", "quality", "sharpness", "caption", "caption_source", "width", "height", "shard"} <= set(manifest.columns)


def test_curation_is_deterministic(image_folder, tmp_path: Path) -> None:
    source, _ = image_folder
    recipe = _recipe()
    ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    first = curate(recipe.curate, tmp_path / "raw", tmp_path / "a")
    second = curate(recipe.curate.model_copy(update={"workers": 1}), tmp_path / "raw", tmp_path / "b")
    assert first.content_hash == second.content_hash


def test_runner_tracks_stages_and_serves_deterministic_ones_from_cache(image_folder, tmp_path, mlflow_uri, monkeypatch):
    source, expected = image_folder
    recipe = _recipe()
    monkeypatch.setenv("REELFORGE_CACHE_DIR", str(tmp_path / "cache"))
    first = execute("ingest", recipe, {}, {"raw_dataset": tmp_path / "raw1"}, source=f"folder:{source}")
    second = execute("ingest", recipe, {}, {"raw_dataset": tmp_path / "raw2"}, source=f"folder:{source}")
    assert first.metadata["content_hash"] == second.metadata["content_hash"]
    assert (tmp_path / "raw2" / "manifest.parquet").is_file()

    client = tracking.client()
    runs = {r.info.run_id: r for r in client.search_runs([tracking.ensure_experiment(recipe.tracking.experiment)])}
    assert runs[first.metadata["mlflow_run_id"]].data.tags.get("reelforge.cache_hit") is None
    assert runs[second.metadata["mlflow_run_id"]].data.tags["reelforge.cache_hit"] == "true"
    assert runs[second.metadata["mlflow_run_id"]].data.params["ingest.shard_size"] == str(recipe.ingest.shard_size)

    # A changed source is a different cache key: the new file is picked up.
    (source / "extra.png").write_bytes((source / "blue" / "blue_1.png").read_bytes()[:-1] + b"\0")
    third = execute("ingest", recipe, {}, {"raw_dataset": tmp_path / "raw3"}, source=f"folder:{source}")
    assert third.metadata["num_samples"] == first.metadata["num_samples"] + 1
