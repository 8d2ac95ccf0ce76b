"""Kill the pretrain stage (SIGKILL, as a preempted KFP task would die) and run it again.

The re-run must continue from the newest valid checkpoint and end with exactly the weights of
an uninterrupted run. Each run is the real `reelforge pretrain` CLI in its own process, on a
small curated folder source with the tiny recipe (fp32 on this CPU), so a kill leaves whatever a
real kill leaves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.config import load_recipe
from models.checkpoint import CHECKPOINT_STATE_FILE, CHECKPOINT_TENSORS_FILE, load_weights
from tests.conftest import curated_discs

STEPS = 16  # tiny recipe: checkpoints every 4 steps, the newest 2 kept
# One pixel-space stage: the stage alone, without an autoencoder input (kept fast for the kill loop).
RECIPE_ARGS = ["--recipe", "tiny", "--set", f"pretrain.steps={STEPS}", "--set", "pretrain.precision=32-true",
               "--set", "autoencoder.kind=pixel", "--set", "model.overrides={}", "--set", "pretrain.stages=[]"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    """A curated dataset, an MLflow store and the environment for the stage processes."""
    root = tmp_path_factory.mktemp("resume")
    curated_discs(root)
    env = {k: v for k, v in os.environ.items() if k not in ("REELFORGE_CHECKPOINT_DIR", "REELFORGE_CACHE_DIR")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return {"root": root, "dataset": root / "curated", "env": env}


def _command(workspace, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "pretrain", *RECIPE_ARGS, "--dataset", str(workspace["dataset"]),
            "--out", str(out)]


def _pretrain(workspace, out: Path, env: dict[str, str] | None = None) -> str:
    """Run the stage to completion; returns its stderr."""
    done = subprocess.run(_command(workspace, out), env=env or workspace["env"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(model_dir / "model.safetensors")


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(workspace) -> Path:
    """The reference: one run from start to end (checkpoints next to the output: no env var set)."""
    out = workspace["root"] / "reference" / "model"
    _pretrain(workspace, out)
    return out


def _stage_run_tags(workspace, stdout: str) -> dict[str, str]:
    """Tags of the MLflow run whose id the stage printed in its metadata JSON (the last thing on stdout)."""
    from mlflow.tracking import MlflowClient

    metadata = json.loads(stdout[stdout.rindex("\n{") + 1 :] if "\n{" in stdout else stdout)
    client = MlflowClient(tracking_uri=workspace["env"]["MLFLOW_TRACKING_URI"])
    return client.get_run(metadata["mlflow_run_id"]).data.tags


def test_sigkilled_pretrain_resumes_and_ends_with_the_uninterrupted_weights(workspace, uninterrupted, tmp_path):
    reference_checkpoints = uninterrupted.parent / "checkpoints" / "pretrain-t2i"
    (key_dir,) = reference_checkpoints.iterdir()  # the fallback location, next to the output
    assert sorted(p.name for p in key_dir.glob("step-*")) == ["step-00000012", "step-00000016"]

    env = {**workspace["env"], "REELFORGE_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    out = tmp_path / "run" / "model"
    process = subprocess.Popen(_command(workspace, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as the first checkpoint is complete: mid-run, mid-epoch (26 samples / batch 8).
        while not list((tmp_path / "checkpoints" / "pretrain-t2i").glob(f"*/step-00000004/{CHECKPOINT_STATE_FILE}")):
            assert process.poll() is None, "the stage ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "state.json").exists(), "killed before the model artifact was written"
    assert not (out.parent / "checkpoints").exists(), "REELFORGE_CHECKPOINT_DIR decides where checkpoints go"
    (key_dir,) = (tmp_path / "checkpoints" / "pretrain-t2i").iterdir()
    steps = sorted(int(p.name.removeprefix("step-")) for p in key_dir.glob("step-*"))
    assert steps and steps[-1] < STEPS

    completed = subprocess.run(_command(workspace, out), env=env, capture_output=True, text=True, timeout=300,
                               cwd=Path(__file__).parents[2])
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = f"[pretrain-t2i] resuming from step {steps[-1]} (checkpoint {key_dir / f'step-{steps[-1]:08d}'})"
    assert line in completed.stderr
    _assert_bitwise_equal(_weights(uninterrupted), _weights(out))
    tags = _stage_run_tags(workspace, completed.stdout)
    assert tags["pretrain-t2i.resumed"] == "true" and tags["pretrain-t2i.resumed_from_step"] == str(steps[-1])


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(workspace, uninterrupted, tmp_path):
    # Start from the reference run's checkpoints (steps 12 and 16), then damage them the ways a
    # kill or a bad disk would: step 16 truncated, a step-20 write that never completed.
    out = tmp_path / "model"
    shutil.copytree(uninterrupted.parent / "checkpoints", tmp_path / "checkpoints")
    (key_dir,) = (tmp_path / "checkpoints" / "pretrain-t2i").iterdir()
    newest = key_dir / "step-00000016" / CHECKPOINT_TENSORS_FILE
    newest.write_bytes(newest.read_bytes()[:1000])
    torn = key_dir / ".step-00000020.k1ll.tmp"
    torn.mkdir()
    (torn / CHECKPOINT_TENSORS_FILE).write_bytes(b"\0" * 100)

    stderr = _pretrain(workspace, out)
    assert f"[pretrain-t2i] ignoring checkpoint: {newest}" in stderr
    assert f"[pretrain-t2i] resuming from step 12 (checkpoint {key_dir / 'step-00000012'})" in stderr
    _assert_bitwise_equal(_weights(uninterrupted), _weights(out))
    assert not torn.exists(), "leftovers of interrupted writes are cleared once a new checkpoint is saved"


def test_finished_run_resumes_at_its_last_step_without_training(workspace, uninterrupted, tmp_path, monkeypatch):
    # In this process (no training happens, so nothing depends on the process's torch state).
    from components.runner import execute

    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace["env"]["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("REELFORGE_CHECKPOINT_DIR", raising=False)
    monkeypatch.delenv("REELFORGE_CACHE_DIR", raising=False)
    out = tmp_path / "model"
    shutil.copytree(uninterrupted.parent / "checkpoints", tmp_path / "checkpoints")
    recipe = load_recipe("tiny", {"pretrain.steps": STEPS, "pretrain.precision": "32-true", "autoencoder.kind": "pixel",
                                  "model.overrides": {}, "pretrain.stages": []})
    result = execute("pretrain", recipe, {"dataset": workspace["dataset"]}, {"model": out})
    assert result.metadata["steps"] == STEPS
    _assert_bitwise_equal(_weights(uninterrupted), _weights(out))
    reference_state = json.loads((uninterrupted / "state.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == STEPS and state["metrics"]["train_loss"] == reference_state["metrics"]["train_loss"]
    tags = _stage_run_tags(workspace, json.dumps(result.metadata))
    assert tags["pretrain-t2i.resumed"] == "true" and tags["pretrain-t2i.resumed_from_step"] == str(STEPS)


def test_one_trainer_per_checkpoint_directory(tmp_path):
    from components.checkpoints import CheckpointDirectoryBusy, exclusive

    with exclusive(tmp_path):
        with pytest.raises(CheckpointDirectoryBusy, match=f"pid {os.getpid()}"):
            with exclusive(tmp_path):
                pass
    with exclusive(tmp_path):  # released on exit (and by the OS when a process dies)
        pass
