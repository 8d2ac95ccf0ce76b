"""The whole training pipeline through KFP's local runner, checked the way a user would look at it.

One run of `recipes/tiny.yaml` on a small Tux Paint subset with a corrupt and a zero-byte file
mixed in, then a second run of the same inputs. Slow-ish (a couple of minutes), so it is one
module-scoped run shared by the assertions below.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components import tracking
from components.config import load_recipe
from pipelines.local import run_training
from tests.conftest import tuxpaint_subset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    source = tuxpaint_subset(root / "source", limit=80)
    good = next(source.rglob("*.png")).read_bytes()
    (source / "broken.png").write_bytes(good[: len(good) // 2])  # a download cut off half-way
    (source / "empty.png").write_bytes(b"")
    recipe = load_recipe("tiny", {"ingest.max_samples": None})
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("REELFORGE_CACHE_DIR", raising=False)
    try:
        first = run_training(recipe, root / "work", source=f"folder:{source}")
        second = run_training(recipe, root / "work", source=f"folder:{source}")
        yield {"first": first, "second": second, "recipe": recipe, "root": root}
    finally:
        monkeypatch.undo()


def _client(run):
    import os

    os.environ["MLFLOW_TRACKING_URI"] = run["first"].tracking_uri
    return tracking.client()


def test_registers_a_candidate_version_with_lineage(pipeline_run) -> None:
    summary = pipeline_run["first"].summary
    assert summary["model_name"] == "reelforge-teacher"
    assert summary["alias"] == "candidate" and summary["created"] is True
    client = _client(pipeline_run)
    version = client.get_model_version_by_alias("reelforge-teacher", "candidate")
    assert str(version.version) == summary["version"] == "1"
    tags = version.tags
    assert tags["dataset.sha256"] == summary["dataset_sha256"] and len(tags["dataset.sha256"]) == 64
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert tags["pipeline.run_id"] == parent.data.tags["reelforge.pipeline_job_id"] != ""
    assert tags["git.commit"] not in ("", "unknown")
    for metric in ("alignment", "category_accuracy", "fd", "realism", "latency_ms"):
        assert float(tags[f"metric.{metric}"]) == pytest.approx(summary[f"metric.{metric}"], rel=1e-4)


def test_every_stage_is_a_nested_finished_run_with_its_config(pipeline_run) -> None:
    client = _client(pipeline_run)
    parent_id = pipeline_run["first"].summary["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    stages = {run.data.tags["reelforge.stage"]: run for run in children}
    recipe = pipeline_run["recipe"]
    pretraining = [f"pretrain-{s.name}" for s in recipe.pretrain.resolved_stages()]
    assert pretraining == ["pretrain-t2i_low", "pretrain-t2i"]  # one task and one run per recipe stage
    assert set(stages) == {"ingest", "curate", "autoencoder", *pretraining, "quality_tune", "evaluate", "register"}
    assert all(run.info.status == "FINISHED" for run in children)
    assert stages["pretrain-t2i"].data.metrics["pretrain-t2i.steps"] == recipe.pretrain.train_config("t2i").steps
    assert stages["pretrain-t2i_low"].data.metrics["pretrain-t2i_low.steps"] == 4  # the stage's own steps
    assert "autoencoder.val_psnr_image" in stages["autoencoder"].data.metrics
    assert stages["curate"].data.metrics["curate.reason.truncated"] == 1
    assert stages["curate"].data.metrics["curate.reason.empty_file"] == 1
    assert "train/loss" in stages["pretrain-t2i"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(stages["pretrain-t2i"].info.run_id, "samples")}
    assert any(path.endswith(".png") for path in artifacts), "sample grids are logged while training"
    eval_artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"report.html", "metrics.json"} <= eval_artifacts
    assert stages["curate"].data.metrics["curate.funnel.input"] == 82


def test_bad_files_are_quarantined_and_shards_written(pipeline_run) -> None:
    root = Path(pipeline_run["first"].workdir) / "pipeline_root"
    curated = [p.parent for p in root.rglob("curate/dataset/manifest.parquet")]
    assert curated, "the curate task wrote its dataset under the pipeline root"
    rejects = pd.read_parquet(curated[0] / "rejects.parquet")
    reasons = dict(zip(rejects["source_path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons["broken.png"] == "truncated" and reasons["empty.png"] == "empty_file"
    assert list(curated[0].glob("train-*.tar")) and list(curated[0].glob("val-*.tar"))


def test_registered_model_serves_images_through_pyfunc(pipeline_run) -> None:
    import mlflow.pyfunc

    _client(pipeline_run)
    # The fluent API keeps a process-wide URI that an earlier test in this process may have set.
    mlflow.set_tracking_uri(pipeline_run["first"].tracking_uri)
    mlflow.set_registry_uri(pipeline_run["first"].tracking_uri)
    model = mlflow.pyfunc.load_model("models:/reelforge-teacher@candidate")
    frame = model.predict(pd.DataFrame({"prompt": ["A red apple.", "A blue truck."]}), params={"steps": 3, "seed": 7})
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in frame["image_png_base64"]]
    size = pipeline_run["recipe"].curate.resolution
    assert [im.size for im in images] == [(size, size)] * 2
    again = model.predict(pd.DataFrame({"prompt": ["A red apple."]}), params={"steps": 3, "seed": 7})
    assert again["image_png_base64"][0] == frame["image_png_base64"][0], "same prompt + seed -> same image"


def test_second_run_reuses_cached_data_stages_and_the_same_version(pipeline_run) -> None:
    client = _client(pipeline_run)
    second = pipeline_run["second"].summary
    assert second["mlflow_parent_run_id"] != pipeline_run["first"].summary["mlflow_parent_run_id"]
    children = client.search_runs(
        [client.get_experiment_by_name(pipeline_run["recipe"].tracking.experiment).experiment_id],
        f"tags.`mlflow.parentRunId` = '{second['mlflow_parent_run_id']}'",
    )
    hits = {r.data.tags["reelforge.stage"] for r in children if r.data.tags.get("reelforge.cache_hit") == "true"}
    assert hits == {"ingest", "curate"}
    # The training stages find their final checkpoints in <workdir>/checkpoints: nothing is retrained.
    tags = {r.data.tags["reelforge.stage"]: r.data.tags for r in children}
    recipe = pipeline_run["recipe"]
    for stage in recipe.pretrain.resolved_stages():
        name = f"pretrain-{stage.name}"
        assert tags[name][f"{name}.resumed_from_step"] == str(recipe.pretrain.train_config(stage.name).steps)
    first_qt = json.loads(next(Path(pipeline_run["first"].workdir).rglob("quality-tune/model/state.json")).read_text())
    assert tags["quality_tune"]["quality_tune.resumed_from_step"] == str(first_qt["step"])  # early stop included
    # Deterministic training on the same data gives the same weights: no duplicate version.
    assert (second["version"], second["created"]) == ("1", False)


def test_evaluation_compares_both_models_side_by_side(pipeline_run) -> None:
    root = Path(pipeline_run["first"].workdir) / "pipeline_root"
    (metrics_file,) = list(root.rglob("evaluate/evaluation/metrics.json"))[:1]
    metrics = json.loads(metrics_file.read_text())
    assert {"pretrained", "tuned", "untrained"} <= set(metrics["models"])
    for name in ("pretrained", "tuned"):
        values = metrics["models"][name]
        assert 0 <= values["category_accuracy"] <= 1 and values["latency_ms"] > 0 and values["fd"] >= 0
        assert (metrics_file.parent / f"grid_{name}.png").is_file()
