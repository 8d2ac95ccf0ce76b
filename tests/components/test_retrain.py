"""Retraining's own logic: only new files are ingested (the rest carry a reason code), and with no
champion in the registry the champion stage says what to do."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
