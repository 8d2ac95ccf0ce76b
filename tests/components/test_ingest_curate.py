"""Ingest + curate on a source with broken files: nothing crashes, nothing is lost, every drop has a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from components import tracking
from components.config import load_recipe
from components.curate.stage import run as curate
from components.ingest.stage import run as ingest
from components.runner import execute
from components.storage import read_manifest
from tests.conftest import BAD_MEDIA_EXPECTED, tuxpaint_subset


def _recipe(**overrides):
    settings = {"ingest.max_samples": None, "curate.min_side": 16, "curate.workers": 2, "curate.batch_size": 8}
    return load_recipe("tiny", {**settings, **overrides})


def _outcomes(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    manifest = read_manifest(directory)
    rejects = pd.read_parquet(directory / "rejects.parquet")
    report = json.loads((directory / "report.json").read_text())
    return manifest, rejects, report


def test_every_bad_input_is_quarantined_or_repaired_with_a_reason(bad_media_source, tmp_path: Path) -> None:
    import resource

    source, files = bad_media_source
    recipe = _recipe(**{"curate.workers": 1})
    raw = ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    assert raw.num_samples == files
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    curate(recipe.curate, tmp_path / "raw", tmp_path / "curated")
    # A 20000x20000 PNG decoded would be 1.2 GB of RGB; the header check must stop it first.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 600_000  # KiB
    manifest, rejects, report = _outcomes(tmp_path / "curated")

    # Every sample has exactly one fate, and every input file is accounted for.
    assert report["accepted"] + report["rejected"] + report["quarantined"] == report["samples"] == len(manifest) + len(rejects)
    assert report["input"] == files
    assert set(manifest["parent_id"]) | set(rejects["parent_id"]) == set(read_manifest(tmp_path / "raw")["id"])
    assert rejects["reason"].notna().all() and rejects["detail"].notna().all() and rejects["step"].notna().all()

    by_name = {Path(p).name: (s, r) for p, s, r in zip(rejects["source_path"], rejects["status"], rejects["reason"])}
    for name, fate in BAD_MEDIA_EXPECTED.items():
        assert by_name.get(name) == fate, f"{name}: {by_name.get(name)} != {fate}"
    detail = rejects.loc[rejects["source_path"].str.endswith("truncated.png"), "detail"].iloc[0]
    assert "truncated.png" in detail

    # 64-bit hashes survive the round trip through Parquet (rows without one must not make it float).
    assert str(manifest["phash"].dtype) in ("Int64", "int64")
    kept = {Path(p).name: row for p, row in zip(manifest["source_path"], manifest.to_dict("records"))}
    repaired = {"jpeg_named.png", "cmyk.jpg", "sixteen_bit.png", "palette.png", "uncaptioned.png", "long_caption.png"}
    fates = {name: kept.get(name, {}).get("id") or by_name.get(name) for name in repaired}
    assert repaired <= set(kept), f"repairable files were dropped: {fates}"
    assert kept["uncaptioned.png"]["caption_source"] == "tagger" and kept["uncaptioned.png"]["caption"]
    assert len(kept["long_caption.png"]["caption"]) <= recipe.curate.captions.max_chars
    assert "\ufffd" not in kept["palette.png"]["caption"]
    assert "cmyk" in kept["cmyk.jpg"]["repairs"].lower() or kept["cmyk.jpg"]["mode"] == "CMYK"

    # The real video was cut into clips, each with its own fate, motion score and camera tag.
    clips = pd.concat([manifest, rejects])
    clips = clips[clips["media"] == "video"].dropna(subset=["clip_start_s"])
    assert len(clips) >= 1 and clips["parent_id"].nunique() == 1
    assert clips["motion"].notna().all() and clips["camera"].notna().all()

    html = (tmp_path / "curated" / "report.html").read_text()
    for text in ("Funnel", "decompression_bomb", "What each filter removed", "<svg"):
        assert text in html


@pytest.mark.parametrize("perceptual_hash", ["phash", "dhash"])
def test_near_and_semantic_duplicates_are_found_across_shards(tmp_path: Path, perceptual_hash: str) -> None:
    from PIL import Image

    source = tuxpaint_subset(tmp_path / "source", 20)
    stamps = sorted(source.rglob("*.png"))
    copies = source / "zz_copies"  # sorted last: lands in another raw shard than its originals
    copies.mkdir()
    for index, stamp in enumerate(stamps[:3]):
        rgba = Image.open(stamp).convert("RGBA")  # composited over white, as curation does
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        image.resize((image.width * 9 // 10, image.height * 9 // 10)).save(copies / f"copy_{index}.jpg", quality=90)
        (copies / f"copy_{index}.txt").write_text("a re-encoded copy")
    recipe = _recipe(**{"ingest.shard_size": 8, "curate.workers": 1, "curate.dedup.hash": perceptual_hash})
    ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    curate(recipe.curate, tmp_path / "raw", tmp_path / "curated")
    manifest, rejects, report = _outcomes(tmp_path / "curated")
    dups = rejects[rejects["reason"].isin(["near_duplicate", "semantic_duplicate"])]
    originals = {Path(p).stem for p in stamps[:3]}
    # Each planted copy or its original is gone (the better-quality one of the pair is kept).
    for index, stamp in enumerate(stamps[:3]):
        pair = {f"copy_{index}", stamp.stem}
        assert len(pair & {Path(p).stem for p in dups["source_path"]}) == 1, (pair, dups[["source_path", "detail"]])
    assert all("kept sample" in d for d in dups["detail"])
    assert originals  # (names used in messages above)
    assert report["funnel"]["near_dedup"] <= report["funnel"]["human_review"]  # dedup comes last


def test_thresholds_remove_with_score_and_changing_them_does_not_rescore(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REELFORGE_CACHE_DIR", str(tmp_path / "cache"))
    source = tuxpaint_subset(tmp_path / "source", 24)
    recipe = _recipe(**{"curate.workers": 1})
    ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    first = curate(recipe.curate, tmp_path / "raw", tmp_path / "a")
    manifest, _, _ = _outcomes(tmp_path / "a")
    for column in ("quality", "sharpness", "clipped", "brisque", "text_area", "unsafe", "alignment", "aesthetic",
                   "cluster", "sample_weight", "bucket", "phash"):
        assert column in manifest.columns, column
    median = float(manifest["aesthetic"].median())
    strict = recipe.curate.model_copy(update={"filters": recipe.curate.filters.model_copy(update={"min_aesthetic": median})})
    second = curate(strict, tmp_path / "raw", tmp_path / "b")
    assert second.summary["resumed_shards"] == len(list((tmp_path / "raw").glob("raw-*.tar")))  # no re-scoring
    _, rejects, _ = _outcomes(tmp_path / "b")
    low = rejects[rejects["reason"] == "low_aesthetic"]
    assert len(low) >= 1 and (low["aesthetic"] < median).all()
    assert all(f"curate.filters.min_aesthetic {median}" in d for d in low["detail"])
    assert second.num_samples == first.num_samples - len(low)


def test_curation_resumes_after_a_crash_and_skips_finished_shards(tmp_path: Path, monkeypatch) -> None:
    from components.curate import shard as shard_module

    monkeypatch.setenv("REELFORGE_CACHE_DIR", str(tmp_path / "cache"))
    source = tuxpaint_subset(tmp_path / "source", 24)
    recipe = _recipe(**{"ingest.shard_size": 8, "curate.workers": 1})
    ingest(recipe.ingest, tmp_path / "raw", f"folder:{source}")
    real_finish = shard_module._finish
    calls = {"n": 0}

    def crash_on_second(job, n_items, results):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash while scoring the second shard")
        return real_finish(job, n_items, results)

    monkeypatch.setattr(shard_module, "_finish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        curate(recipe.curate, tmp_path / "raw", tmp_path / "out")
    monkeypatch.setattr(shard_module, "_finish", real_finish)
    resumed = curate(recipe.curate, tmp_path / "raw", tmp_path / "out")
    assert resumed.summary["resumed_shards"] == 1
    clean = curate(recipe.curate, tmp_path / "raw", tmp_path / "clean")
    assert resumed.content_hash == clean.content_hash


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


def test_retraining_curation_rejects_copies_of_the_earlier_datasets_samples(tmp_path: Path) -> None:
    """Re-encoded copies of samples an earlier dataset holds have new bytes (ingest takes them), so curation
    compares them with that dataset's reference: the earlier copy wins and the detail names it."""
    from PIL import Image

    from components.curate.reference import Reference

    recipe = _recipe(**{"curate.workers": 1})
    source = tuxpaint_subset(tmp_path / "source", 24)
    stamps = sorted(source.rglob("*.png"))
    first = tmp_path / "first"
    first.mkdir()
    for stamp in stamps[:16]:
        for path in (stamp, stamp.with_suffix(".txt")):
            if path.exists():
                (first / path.name).write_bytes(path.read_bytes())
    ingest(recipe.ingest, tmp_path / "raw1", f"folder:{first}")
    curate(recipe.curate, tmp_path / "raw1", tmp_path / "curated1")
    earlier = read_manifest(tmp_path / "curated1")
    assert len(earlier) >= 3

    second = tmp_path / "second"  # 3 re-encoded copies of accepted samples + the 8 stamps not seen before
    second.mkdir()
    copied = earlier.head(3)
    for row in copied.itertuples():
        rgba = Image.open(row.source_path).convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        image.resize((image.width * 9 // 10, image.height * 9 // 10)).save(second / f"copy_{row.id}.jpg", quality=90)
        (second / f"copy_{row.id}.txt").write_text(str(row.caption))
    for stamp in stamps[16:]:
        for path in (stamp, stamp.with_suffix(".txt")):
            if path.exists():
                (second / path.name).write_bytes(path.read_bytes())
    ingest(recipe.ingest, tmp_path / "raw2", f"folder:{second}")
    import numpy as np

    Reference.of_dataset(earlier, np.load(tmp_path / "curated1" / "embeddings.npy")).save(tmp_path / "raw2")
    curate(recipe.curate, tmp_path / "raw2", tmp_path / "curated2")
    manifest, rejects, _ = _outcomes(tmp_path / "curated2")
    copies = rejects[rejects["source_path"].str.contains("/copy_")]
    assert len(copies) == 3 and set(copies["reason"]) <= {"near_duplicate", "semantic_duplicate"}, copies
    for row in copies.itertuples():
        kept_id = Path(row.source_path).stem.removeprefix("copy_")
        assert f"sample {kept_id} of an earlier dataset" in row.detail
    assert not manifest["source_path"].str.contains("/copy_").any()
    assert len(manifest) >= 4  # the new stamps are still curated normally
