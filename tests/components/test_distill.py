"""The distill stage on a tiny curated dataset: three teachers (the tuned input, a directory, a registered
version), a shallower student, guidance distillation + two progressive rounds, through the runner and MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from components.config import load_recipe
from components.runner import execute
from models.checkpoint import load_weights
from models.generate import TextToImage
from tests.conftest import curated_discs, stage_environment, write_model_dir

pytestmark = pytest.mark.slow  # curation + three short fits + a re-run: about a minute on 2 cores

OVERRIDES = {
    "distill.steps": 6,
    "distill.round_steps": 4,
    "distill.batch_size": 8,
    "distill.warmup_steps": 1,
    "distill.teacher_steps": 8,
    "distill.student_steps": 2,
    "distill.student_depth": 1,
    "distill.checkpoint_every": 3,
    "distill.precision": "32-true",
    "evaluate.grid_prompts": 4,
}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Curate discs, make three tiny teachers (one registered in MLflow), run the stage once."""
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("distill")
    monkeypatch = stage_environment(root)
    dataset = curated_discs(root)
    tuned = write_model_dir(root / "tuned", seed=0)
    other = write_model_dir(root / "other", seed=1)
    registered = write_model_dir(root / "registered", seed=2)
    # Registered the way the register stage does it: the project's pyfunc with the directory as `model_dir`.
    pyfunc = Path(__file__).resolve().parents[2] / "components" / "register" / "pyfunc_model.py"
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="teacher", python_model=str(pyfunc),
                                       artifacts={"model_dir": str(registered)}, registered_model_name="teacher-b")
    uri = f"models:/teacher-b/{info.registered_model_version}"
    teachers = [{"source": "tuned", "weight": 2.0}, {"source": str(other), "weight": 1.0},
                {"source": uri, "weight": 1.0}]
    recipe = load_recipe("tiny", {**OVERRIDES, "distill.teachers": teachers})
    result = execute("distill", recipe, {"dataset": dataset, "tuned": tuned}, {"model": root / "student"})
    yield {"root": root, "recipe": recipe, "dataset": dataset, "tuned": tuned, "result": result,
           "registered": registered}
    monkeypatch.undo()


def test_student_directory_loads_as_a_distilled_model_that_samples_at_its_steps(distilled):
    student_dir = distilled["root"] / "student"
    generator = TextToImage.from_dir(student_dir)
    assert generator.distilled and generator.default_steps == 2
    assert generator.default_guidance == distilled["recipe"].evaluate.sampling.guidance
    images = generator(["a red circle", "a blue circle"], seed=3)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, generator(["a red circle", "a blue circle"], seed=3))  # same seed, same images
    config = json.loads((student_dir / "config.json").read_text())
    assert config["model"]["guidance_embed"] is True and config["model"]["depth"] == 1
    assert config["sampling"]["steps"] == 2
    distill = config["distill"]
    assert distill["method"] == "guidance+progressive"
    assert (distill["teacher_steps"], distill["student_steps"], distill["rounds"]) == (8, 2, 2)
    assert [t["weight"] for t in distill["teachers"]] == [0.5, 0.25, 0.25]
    assert distill["teachers"][2]["source"].startswith("models:/teacher-b/")
    from components.media import sha256_file

    assert distill["teachers"][0]["weights_sha256"] == sha256_file(distilled["tuned"] / "model.safetensors")
    assert distill["teachers"][2]["weights_sha256"] == sha256_file(distilled["registered"] / "model.safetensors")
    state = json.loads((student_dir / "state.json").read_text())
    assert state["stage"] == "distill" and state["step"] == 6 + 4 + 4
    for phase in ("guidance", "steps4", "steps2"):
        assert np.isfinite(state["metrics"][f"{phase}_train_loss"]), phase
        assert np.isfinite(state["metrics"][f"{phase}_val_loss"]), phase


def test_mlflow_has_the_phase_losses_and_the_student_teacher_grid(distilled):
    run_id = distilled["result"].metadata["mlflow_run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.run_name == "distill"
    for phase in ("guidance", "steps4", "steps2"):
        assert np.isfinite(run.data.metrics[f"distill.{phase}.final_train_loss"]), phase
        assert np.isfinite(run.data.metrics[f"distill.{phase}.val_loss"]), phase
        assert len(client.get_metric_history(run_id, f"train/{phase}_loss")) >= 1, phase
    assert run.data.params["distill.student_steps"] == "2"
    grids = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert "samples/distill_student_vs_teacher.png" in grids


def test_rerun_resumes_finished_phases_from_their_checkpoints_and_gives_the_same_student(distilled):
    root = distilled["root"]
    recipe = distilled["recipe"]
    result = execute("distill", recipe, {"dataset": distilled["dataset"], "tuned": distilled["tuned"]},
                     {"model": root / "student-again"})
    tags = MlflowClient().get_run(result.metadata["mlflow_run_id"]).data.tags
    assert tags["distill-guidance.resumed_from_step"] == "6" and tags["distill-steps2.resumed_from_step"] == "4"
    first, again = load_weights(root / "student" / "model.safetensors"), load_weights(root / "student-again" /
                                                                                       "model.safetensors")
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    # Other teacher weights: a new checkpoint directory, never the old student's checkpoints.
    other_tuned = write_model_dir(root / "tuned-2", seed=7)
    changed = execute("distill", recipe, {"dataset": distilled["dataset"], "tuned": other_tuned},
                      {"model": root / "student-other"})
    tags = MlflowClient().get_run(changed.metadata["mlflow_run_id"]).data.tags
    assert tags["distill-guidance.resumed_from_step"] == "0"


def test_teachers_with_another_text_encoder_or_no_tuned_input_are_refused_by_name(distilled, tmp_path):
    from components.distill.stage import load_teachers

    odd = write_model_dir(tmp_path / "odd", seed=3)
    config = json.loads((odd / "config.json").read_text())
    config["text"]["max_tokens"] = 12
    (odd / "config.json").write_text(json.dumps(config))
    recipe = load_recipe("tiny", {"distill.teachers": [{"source": "tuned"}, {"source": str(odd)}]})
    with pytest.raises(ValueError, match=f"teacher '{odd}'.*text encoder"):
        load_teachers(recipe.distill, {"tuned": distilled["tuned"]}, tmp_path / "downloads")
    with pytest.raises(ValueError, match="teacher 'pretrained': no pretrained model"):
        load_teachers(load_recipe("tiny", {"distill.teachers": [{"source": "pretrained"}]}).distill,
                      {"tuned": distilled["tuned"]}, tmp_path / "downloads")
    student = shutil.copytree(distilled["root"] / "student", tmp_path / "student")
    with pytest.raises(ValueError, match="already a distilled student"):
        load_teachers(load_recipe("tiny", {"distill.teachers": [{"source": str(student)}]}).distill, {},
                      tmp_path / "downloads")
