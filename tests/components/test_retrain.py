"""Retraining's own logic: only new files are ingested (the rest carry a reason code), and with no
champion in the registry the champion stage says what to do."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import load_recipe
from components.ingest.stage import DUP_EXISTING, SKIPPED, NothingNewError, run
from components.retrain.stage import RetrainError
from components.retrain.stage import run as resolve_champion
from tests.conftest import tuxpaint_subset


def test_ingest_leaves_out_known_bytes_with_a_reason_code(tmp_path: Path) -> None:
    source = tuxpaint_subset(tmp_path / "source", limit=6)
    files = sorted(source.rglob("*.png"))
    known = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files[:4]}
    config = load_recipe("tiny").ingest
    result = run(config, tmp_path / "raw", f"folder:{source}", known_sha256=known)
    manifest = pd.read_parquet(tmp_path / "raw" / "manifest.parquet")
    skipped = pd.read_parquet(tmp_path / "raw" / SKIPPED)
    assert result.num_samples == 2 and set(manifest["sha256"]).isdisjoint(known)
    assert set(skipped["sha256"]) == known and set(skipped["reason"]) == {DUP_EXISTING}
    with pytest.raises(NothingNewError, match="nothing new to train on: all 6 files"):
        run(config, tmp_path / "again", f"folder:{source}",
            known_sha256={hashlib.sha256(p.read_bytes()).hexdigest() for p in files})


def test_without_a_champion_retraining_says_how_to_get_one(tmp_path: Path, mlflow_uri: str) -> None:
    with pytest.raises(RetrainError, match=r"no 'champion' version .*reelforge run.*reelforge promote"):
        resolve_champion(load_recipe("tiny"), tmp_path / "t", tmp_path / "a", tmp_path / "k")


def test_a_retrained_champions_known_set_keeps_what_its_ancestors_saw(tmp_path: Path, mlflow_uri: str) -> None:
    """Retraining writes known ∪ ingested next to the raw shards; the champion stage reads it back from the
    curate run of the retrained champion's dataset, so old files stay known one generation later."""
    from components import tracking
    from components.ingest.stage import KNOWN_FILE, new_stage
    from components.curate.reference import Reference
    from components.retrain.stage import _known_files

    source = tuxpaint_subset(tmp_path / "source", limit=6)
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*.png"))
    (tmp_path / "known").mkdir()
    pd.DataFrame({"sha256": digests[:4] + ["f" * 64]}).to_parquet(tmp_path / "known" / KNOWN_FILE)
    earlier = pd.DataFrame({"id": ["s1", "s2"], "phash": [7, 9]})
    Reference.of_dataset(earlier, np.eye(2, 8, dtype=np.float32)).save(tmp_path / "known")
    outputs = {"raw_dataset": tmp_path / "raw"}

    class Tracker:
        def set_tags(self, tags: dict) -> None:
            self.tags = tags

    new_stage(load_recipe("tiny"), {"known": tmp_path / "known"}, outputs, Tracker(), None, source=f"folder:{source}")
    lineage = set(pd.read_parquet(tmp_path / "raw" / KNOWN_FILE)["sha256"])
    assert lineage == set(digests) | {"f" * 64}  # the old known set and the two files ingested now
    assert Reference.load(tmp_path / "raw").rows["id"].tolist() == ["s1", "s2"]  # for curate to dedup against

    # The retrained dataset's curate run holds only the new files in its manifest, and the lineage file.
    client = tracking.client()
    experiment = tracking.ensure_experiment("reelforge-test")
    curate_run = client.create_run(experiment, tags={"dataset.sha256": "d" * 64})
    pd.DataFrame({"sha256": digests[4:]}).to_parquet(tmp_path / "manifest.parquet")
    client.log_artifact(curate_run.info.run_id, str(tmp_path / "manifest.parquet"))
    client.log_artifact(curate_run.info.run_id, str(tmp_path / "raw" / KNOWN_FILE))
    assert _known_files(client, "reelforge-test", "d" * 64, tmp_path / "out") == len(lineage)
    assert set(pd.read_parquet(tmp_path / "out" / KNOWN_FILE)["sha256"]) == lineage
    assert Reference.load(tmp_path / "out") is None  # this curate run logged no dedup reference
    grown = Reference.load(tmp_path / "raw").union(Reference.of_dataset(pd.DataFrame({"id": ["s3"], "phash": [1]}),
                                                                        np.ones((1, 8), np.float32)))
    for path in grown.save(tmp_path / "logged"):
        client.log_artifact(curate_run.info.run_id, str(path))
    _known_files(client, "reelforge-test", "d" * 64, tmp_path / "out")
    reference = Reference.load(tmp_path / "out")
    assert reference.rows["id"].tolist() == ["s1", "s2", "s3"] and reference.rows["embedding_row"].tolist() == [0, 1, 2]
    assert np.array_equal(reference.embeddings[2], np.ones(8, np.float32))
