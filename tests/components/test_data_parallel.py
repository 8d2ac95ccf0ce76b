"""`strategy: ddp` with two CPU processes: both train on their own batches, rank 0 alone tracks and writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from components.config import load_recipe
from models.checkpoint import load_model_dir
from tests.conftest import curated_discs


def test_two_process_ddp_pretraining_writes_one_model_and_one_mlflow_run(tmp_path: Path):
    dataset = curated_discs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("REELFORGE_CHECKPOINT_DIR", "REELFORGE_CACHE_DIR")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "pipelines.cli", "pretrain", "--recipe", "tiny",
               "--set", "autoencoder.kind=pixel", "--set", "model.overrides={}", "--set", "pretrain.stages=[]",
               "--set", "pretrain.strategy=ddp", "--set", "pretrain.devices=2", "--set", "pretrain.accelerator=cpu",
               "--set", "pretrain.steps=6", "--set", "pretrain.threads=1",
               "--dataset", str(dataset), "--out", str(tmp_path / "model")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr  # a second training process really ran
    losses = re.findall(r"\[pretrain-t2i\] step 6/6 loss ([0-9.]+)", done.stderr)
    assert len(losses) == 2 and losses[0] != losses[1]  # each rank saw its own batches
    assert done.stdout.count('"steps": 6') == 1  # only rank 0 reports
    weights, config, state = load_model_dir(tmp_path / "model")
    assert state["step"] == 6 and config["training"]["pretrain-t2i"]["strategy"] == "ddp"
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(load_recipe("tiny").tracking.experiment).experiment_id])
    assert [r.info.run_name for r in runs] == ["pretrain-t2i"]  # rank 1 opened no run of its own
    assert runs[0].data.tags["pretrain-t2i.strategy"] == "ddp"
