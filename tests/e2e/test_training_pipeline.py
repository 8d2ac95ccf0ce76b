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
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "REELFORGE_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
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


def test_registers_student_and_teacher_promotes_and_serves_the_champion(pipeline_run) -> None:
    summary = pipeline_run["first"].summary
    assert summary["model_name"] == "reelforge" and summary["created"] is True
    client = _client(pipeline_run)
    version = client.get_model_version_by_alias("reelforge", "candidate")
    assert str(version.version) == summary["version"] == "1"
    # First run: no champion to beat, the tiny recipe's thresholds pass -> champion, and deploy served it.
    assert summary["promoted"] is True and summary["gate_passed"] is True
    assert client.get_model_version_by_alias("reelforge", "champion").version == version.version
    assert summary["deploy_status"].startswith("serving") or "champion" in summary["deploy_status"]
    assert summary["smoke_latency_ms"] > 0 and "reelforge serve --model models:/reelforge@champion" in summary["serve_command"]
    tags = version.tags
    teacher = client.get_model_version_by_alias("reelforge-teacher", "candidate")
    assert tags["parent.teacher"] == f"reelforge-teacher/{teacher.version}" == summary["teacher"]
    assert tags["dataset.sha256"] == summary["dataset_sha256"] and len(tags["dataset.sha256"]) == 64
    assert teacher.tags["dataset.sha256"] == tags["dataset.sha256"]
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert tags["pipeline.run_id"] == parent.data.tags["reelforge.pipeline_job_id"] != ""
    assert tags["git.commit"] not in ("", "unknown") and tags["dvc.revision"]
    for metric in ("alignment", "category_accuracy", "fid", "realism", "latency_ms"):
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
    assert set(stages) == {"ingest", "curate", "autoencoder", *pretraining, "quality_tune", "distill", "evaluate",
                           "register", "deploy"}
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
    assert {"report.html", "metrics.json", "model_card.md", "model_card.html"} <= eval_artifacts
    assert stages["curate"].data.metrics["curate.funnel.input"] == 82


def test_bad_files_are_quarantined_and_shards_written(pipeline_run) -> None:
    root = Path(pipeline_run["first"].workdir) / "pipeline_root"
    curated = [p.parent for p in root.rglob("curate/dataset/manifest.parquet")]
    assert curated, "the curate task wrote its dataset under the pipeline root"
    rejects = pd.read_parquet(curated[0] / "rejects.parquet")
    reasons = dict(zip(rejects["source_path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons["broken.png"] == "truncated" and reasons["empty.png"] == "empty_file"
    assert list(curated[0].glob("train-*.tar")) and list(curated[0].glob("val-*.tar"))


def test_registered_student_serves_images_through_pyfunc(pipeline_run) -> None:
    import mlflow.pyfunc

    _client(pipeline_run)
    # The fluent API keeps a process-wide URI that an earlier test in this process may have set.
    mlflow.set_tracking_uri(pipeline_run["first"].tracking_uri)
    mlflow.set_registry_uri(pipeline_run["first"].tracking_uri)
    model = mlflow.pyfunc.load_model("models:/reelforge@champion")
    frame = model.predict(pd.DataFrame({"prompt": ["A red apple.", "A blue truck."]}), params={"seed": 7})
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in frame["media_base64"]]
    size = pipeline_run["recipe"].curate.resolution
    assert [im.size for im in images] == [(size, size)] * 2 and set(frame["format"]) == {"png"}
    again = model.predict(pd.DataFrame({"prompt": ["A red apple."]}), params={"seed": 7})
    assert again["media_base64"][0] == frame["media_base64"][0], "same prompt + seed -> same image"


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
    # Every distillation phase (guidance, then each progressive round) finds its finished checkpoint too.
    phases = {k: v for k, v in tags["distill"].items() if k.endswith(".resumed_from_step")}
    assert len(phases) == 1 + recipe.distill.rounds() and "0" not in phases.values()
    # Deterministic training on the same data gives the same weights: no duplicate version, and the
    # champion stays where it is.
    assert (second["version"], second["created"]) == ("1", False)
    assert str(client.get_model_version_by_alias("reelforge", "champion").version) == "1"


def test_evaluation_compares_every_model_side_by_side(pipeline_run) -> None:
    root = Path(pipeline_run["first"].workdir) / "pipeline_root"
    (metrics_file,) = list(root.rglob("evaluate/evaluation/metrics.json"))[:1]
    metrics = json.loads(metrics_file.read_text())
    assert {"untrained", "pretrained", "tuned", "student"} <= set(metrics["models"])
    for name in ("pretrained", "tuned", "student"):
        values = metrics["models"][name]
        assert 0 <= values["category_accuracy"] <= 1 and values["latency_ms"] > 0 and values["fid"] >= 0
        assert (metrics_file.parent / "grids" / f"{name}.png").is_file()
    recipe = pipeline_run["recipe"]
    assert metrics["models"]["student"]["steps"] == recipe.distill.student_steps
    assert metrics["models"]["tuned"]["steps"] == recipe.evaluate.sampling.steps
    assert 0 <= metrics["ab"]["student_vs_tuned"]["win_rate"] <= 1


def test_retraining_takes_only_new_files_fine_tunes_the_champion_and_applies_the_gate(pipeline_run) -> None:
    """Runs after the training pipeline (last in this module): new stamps plus the old source."""
    import shutil

    from pipelines.local import run_retraining
    from tests.conftest import TUXPAINT

    root, recipe = pipeline_run["root"], pipeline_run["recipe"]
    source = root / "source-grown"
    shutil.copytree(root / "source", source)
    old = {p.relative_to(root / "source") for p in (root / "source").rglob("*.png")}
    new = [p for p in sorted(TUXPAINT.rglob("*.png")) if p.relative_to(TUXPAINT) not in old][:40]
    for stamp in new:
        target = source / "new" / stamp.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stamp, target)
        if stamp.with_suffix(".txt").exists():
            shutil.copy(stamp.with_suffix(".txt"), target.with_suffix(".txt"))
    renamed = next((root / "source").rglob("*.png"))
    shutil.copy(renamed, source / "new" / "same-bytes-new-name.png")  # known bytes under a new name
    # An accepted sample of the champion's dataset, re-encoded: new bytes (ingest takes it), same picture.
    from PIL import Image

    first_dataset = next((root / "work" / "pipeline_root").glob("reelforge-training-*/**/curate/dataset"))
    accepted = pd.read_parquet(first_dataset / "manifest.parquet").iloc[0]
    rgba = Image.open(accepted["source_path"]).convert("RGBA")
    Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB").save(
        source / "new" / "reencoded-copy.jpg", quality=90)
    (source / "new" / "reencoded-copy.txt").write_text(str(accepted["caption"]))
    client = _client(pipeline_run)
    champion_before = str(client.get_model_version_by_alias("reelforge", "champion").version)

    result = run_retraining(recipe, root / "work", source=f"folder:{source}")

    run_dir = max((root / "work" / "pipeline_root").glob("reelforge-retraining-*"), key=lambda p: p.stat().st_mtime)
    raw = next(run_dir.rglob("raw_dataset"))
    ingested = pd.read_parquet(raw / "manifest.parquet")
    skipped = pd.read_parquet(raw / "skipped.parquet")
    assert set(ingested["relative_path"].map(lambda p: Path(p).name)) == {p.name for p in new} | {"reencoded-copy.jpg"}
    assert set(skipped["reason"]) == {"dup_existing"}
    assert "same-bytes-new-name.png" in set(skipped["source_path"].map(lambda p: Path(p).name))
    assert len(skipped) == len(old) + 1  # every old file (the broken and empty ones too) and the renamed copy
    # Curation compared the new files with the champion's dataset: the re-encoded copy is a duplicate of it.
    rejects = pd.read_parquet(next(run_dir.rglob("curate/dataset")) / "rejects.parquet")
    copy = rejects[rejects["source_path"].str.endswith("reencoded-copy.jpg")]
    assert len(copy) == 1 and copy.iloc[0]["reason"] in {"near_duplicate", "semantic_duplicate"}, copy
    assert f"sample {accepted['id']} of an earlier dataset" in copy.iloc[0]["detail"]

    summary = result.summary
    version = client.get_model_version("reelforge", summary["version"])
    assert summary["created"] and int(summary["version"]) > int(champion_before)
    teacher_name, _, teacher_version = version.tags["parent.teacher"].rpartition("/")
    assert teacher_name == "reelforge-teacher" and int(teacher_version) > 1  # the fine-tuned teacher, registered
    champion_after = str(client.get_model_version_by_alias("reelforge", "champion").version)  # int or str by store
    assert champion_after == (str(summary["version"]) if summary["gate_passed"] else champion_before)

    # The retrained version as champion (by the gate, or by hand as `reelforge promote` would): its own
    # dataset holds only the 40 new files, yet the old ones are still known through its lineage, so the
    # same grown source has nothing new and the run stops at ingest and says so.
    if not summary["gate_passed"]:
        from components.register.registry import promote

        promote(client, "reelforge", summary["version"])
    # The error names the stage and why (from the stage run's error tag), not only the KFP task.
    with pytest.raises(RuntimeError, match=f"ingest_new: NothingNewError: nothing new to train on: all "
                                           f"{len(old) + len(new) + 2} files"):
        run_retraining(recipe, root / "work", source=f"folder:{source}")
