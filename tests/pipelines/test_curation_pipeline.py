"""The curation pipeline through kfp.local: a ParallelFor over raw shards, then the global merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import load_recipe
from components.curate.stage import run as curate
from pipelines.cli import main
from tests.conftest import tuxpaint_subset


@pytest.mark.slow
def test_shard_parallel_curation_equals_the_single_task(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REELFORGE_CACHE_DIR", raising=False)
    source = tuxpaint_subset(tmp_path / "source", 24)
    overrides = ["ingest.max_samples=null", "ingest.shard_size=8", "curate.scorers=[technical,features,aesthetic]"]
    args = ["run", "--pipeline", "curation", "--recipe", "tiny", "--workdir", str(tmp_path / "work"),
            "--source", f"folder:{source}"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    printed = capsys.readouterr().out
    dataset = Path(next(line.split(":", 1)[1].strip() for line in printed.splitlines() if line.startswith("dataset:")))
    report = json.loads((dataset / "report.json").read_text())
    assert report["input"] == 24 and report["accepted"] >= 20
    runs = list((tmp_path / "work" / "pipeline_root").glob("reelforge-curation-*/for-loop-*-iteration-*"))
    assert len(runs) == 3  # one scoring task per raw shard

    # The same recipe in one task (the training pipeline's curate) gives the same bytes.
    recipe = load_recipe("tiny", {"ingest.max_samples": None, "ingest.shard_size": 8,
                                  "curate.scorers": ["technical", "features", "aesthetic"]})
    raw = dataset.parent.parent / "ingest" / "raw_dataset"
    single = curate(recipe.curate, raw, tmp_path / "single")
    assert single.content_hash == report["content_hash"]
