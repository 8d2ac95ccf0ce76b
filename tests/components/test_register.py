"""Register stage: student + teacher versions with lineage, the promotion gate, promote/rollback, the pyfunc.

Everything runs against a real SQLite MLflow registry (the `mlflow_uri` fixture) with tiny real
model directories (`write_model_dir`); nothing in MLflow is mocked.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import tracking
from components.config import GateConfig, load_recipe
from components.register import registry
from components.register.registry import RegistryError
from components.register.stage import RegisterError, decide, dvc_revision, gate_inputs, register_model_dir
from components.runner import RunContext, execute
from tests.conftest import write_model_dir


def _evaluation(root: Path, win_rate: float | None, alignment: float = 0.3, ci_low: float | None = None) -> Path:
    """An evaluation output directory whose metrics.json has the evaluate stage's gate_inputs."""
    root.mkdir(parents=True, exist_ok=True)
    gate = {"candidate": "student", "alignment": alignment, "aesthetic": 0.5, "fid": 40.0, "latency_ms": 12.0,
            "win_rate_vs_champion": win_rate, "win_rate_ci_low": ci_low}
    models = {"student": {"alignment": alignment, "aesthetic": 0.5, "fd": 40.0, "latency_ms": 12.0},
              "tuned": {"alignment": 0.35, "aesthetic": 0.55, "fd": 35.0, "latency_ms": 50.0}}
    (root / "metrics.json").write_text(json.dumps({"gate_inputs": gate, "models": models}), encoding="utf-8")
    return root


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "report.json").write_text(json.dumps({"content_hash": "d" * 64}), encoding="utf-8")
    return root


# --- the gate (pure) -----------------------------------------------------------------------------

def test_gate_checks_each_threshold_and_names_what_failed() -> None:
    gate = GateConfig(min_alignment=0.2, min_aesthetic=0.1, max_fid=50, max_latency_ms=100, min_win_rate=0.5)
    values = {"alignment": 0.3, "aesthetic": 0.4, "fid": 45.0, "latency_ms": 20.0, "win_rate_vs_champion": None}
    first = decide(gate, values, champion=None)
    assert first.passed and "no champion yet" in first.reason
    assert first.metrics()["gate.fid.threshold"] == 50 and first.metrics()["gate.passed"] == 1.0

    worse = decide(gate, {**values, "fid": 60.0, "latency_ms": 150.0}, champion=None)
    assert not worse.passed
    assert worse.reason == "failed: fid 60 > 50; latency_ms 150 > 100"
    assert [c.name for c in worse.checks if not c.passed] == ["fid", "latency_ms"]

    # With a champion the candidate must beat it; an evaluation that did not compare cannot promote.
    assert not decide(gate, values, champion="3").passed
    assert "champion v3 exists but the evaluation has no win rate" in decide(gate, values, champion="3").reason
    assert decide(gate, {**values, "win_rate_vs_champion": 0.7}, champion="3").passed
    assert not decide(gate, {**values, "win_rate_vs_champion": 0.5}, champion="3").passed  # must exceed
    stale = decide(gate, {**values, "win_rate_vs_champion": 0.9}, champion="3", evaluated_champion="2")
    assert not stale.passed and "measured against v2 but the champion is now v3" in stale.reason

    strict = GateConfig(min_win_rate=0.5, require_significant=True)
    lucky = {**values, "win_rate_vs_champion": 0.7, "win_rate_ci_low": 0.45}
    assert not decide(strict, lucky, champion="3").passed
    assert decide(strict, {**lucky, "win_rate_ci_low": 0.55}, champion="3").passed
    # A missing measurement fails its check instead of passing silently.
    assert "alignment was not measured" in decide(gate, {**values, "alignment": None}, champion=None).reason


def test_gate_inputs_fall_back_to_the_student_metrics_and_say_so() -> None:
    values, source = gate_inputs({"models": {"student": {"alignment": 0.4, "aesthetic": 0.3, "fd": 12.0}}})
    assert source.startswith("models.student") and values["fid"] == 12.0 and values["win_rate_vs_champion"] is None
    with pytest.raises(RegisterError, match="neither 'gate_inputs' nor models.student"):
        gate_inputs({"models": {"tuned": {}}})


def test_dvc_revision_is_the_commit_that_last_changed_dvc_lock(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert dvc_revision(tmp_path) == "untracked"  # not a DVC repository
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert dvc_revision(tmp_path) == "untracked"  # dvc.lock never committed
    git("add", ".")
    git("commit", "-qm", "lock")
    locked = git("rev-parse", "HEAD")
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")
    git("commit", "-qm", "other")
    assert dvc_revision(tmp_path) == locked  # the later commit did not touch dvc.lock
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert dvc_revision(tmp_path) == f"{locked}+modified"


# --- the stage against a real registry -----------------------------------------------------------

@pytest.mark.slow
def test_register_stage_records_lineage_and_the_gate_moves_champion_and_previous(mlflow_uri: str, tmp_path: Path,
                                                                                  capsys) -> None:
    recipe = load_recipe("tiny")
    teacher = write_model_dir(tmp_path / "teacher", seed=1)
    data = _dataset(tmp_path / "data")
    context = RunContext(pipeline_job_id="job-123456789", pipeline_name="reelforge-training", git_commit="abc123")

    def register(seed: int, win_rate: float | None, name: str):
        student = write_model_dir(tmp_path / f"student-{seed}", guidance_embed=True, seed=seed)
        inputs = {"student": student, "teacher": teacher, "dataset": data,
                  "evaluation": _evaluation(tmp_path / f"eval-{name}", win_rate)}
        return execute("register", recipe, inputs, {}, context).metadata

    client = tracking.client()
    first = register(2, None, "first")
    assert first["model_uri"] == "models:/reelforge/1" and first["gate.passed"] and first["gate.promoted"]
    assert registry.aliases(client, "reelforge") == {"candidate": "1", "champion": "1"}
    assert registry.aliases(client, "reelforge-teacher") == {"candidate": "1"}
    version = client.get_model_version("reelforge", "1")
    tags = version.tags
    assert tags["parent.teacher"] == "reelforge-teacher/1"
    assert tags["distill.teachers"] == "tuned (weight 1.0)" and tags["distill.student_steps"] == "2"
    assert tags["dataset.sha256"] == "d" * 64 and tags["git.commit"] == "abc123"
    assert tags["pipeline.run_id"] == "job-123456789" and tags["recipe"] == "tiny"
    assert tags["mlflow.run_id"] == first["mlflow_run_id"] and tags["training.stage"] == "distill"
    assert tags["dvc.revision"]  # a commit here, or "untracked" where the checkout has no committed dvc.lock
    assert tags["metric.alignment"] == "0.3" and tags["gate.passed"] == "true"
    teacher_tags = client.get_model_version("reelforge-teacher", "1").tags
    assert teacher_tags["training.stage"] == "quality_tune" and teacher_tags["metric.alignment"] == "0.35"
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.metrics["gate.passed"] == 1.0 and run.data.tags["gate.reason"].startswith("passed")
    assert "gate (gate_inputs): PASSED" in capsys.readouterr().out

    # A better student: champion moves to it, the old champion becomes previous; the teacher's
    # identical weights are not registered again.
    second = register(3, 0.7, "second")
    assert (second["version"], second["teacher_version"], second["gate.promoted"]) == ("2", "1", True)
    assert registry.aliases(client, "reelforge") == {"candidate": "2", "champion": "2", "previous": "1"}
    assert len(client.search_model_versions("name = 'reelforge-teacher'")) == 1

    # A worse one stays a candidate, and its version says why.
    third = register(4, 0.3, "third")
    assert not third["gate.passed"] and not third["gate.promoted"]
    assert registry.aliases(client, "reelforge") == {"candidate": "3", "champion": "2", "previous": "1"}
    assert client.get_model_version("reelforge", "3").tags["gate.reason"] == \
        "failed: win rate vs champion v2 0.300 <= 0.5"
    out = capsys.readouterr().out
    assert "FAILED: failed: win rate vs champion v2" in out

    # The champion's own weights again: no new version, champion and previous stay.
    again = register(3, 0.9, "again")
    assert (again["version"], again["created"], again["gate.promoted"]) == ("2", False, False)
    assert "already champion" in again["gate.reason"]
    assert registry.aliases(client, "reelforge") == {"candidate": "2", "champion": "2", "previous": "1"}
    assert len(client.search_model_versions("name = 'reelforge'")) == 3


def _versions(name: str, count: int) -> None:
    """`count` metadata-only versions (alias operations never load a model)."""
    client = tracking.client()
    for _ in range(count):
        registry.create_version(client, name, "file:///nonexistent/model", None, {})


def test_promote_and_rollback_from_the_cli(mlflow_uri: str, tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    _versions("reelforge", 4)
    client = tracking.client()
    assert main(["promote", "reelforge", "--version", "1", "--workdir", str(tmp_path)]) == 0
    assert "champion: (none) -> v1" in capsys.readouterr().out
    for version in ("2", "3"):
        assert main(["promote", "reelforge", "--version", version]) == 0
    assert "champion: v2 -> v3" in capsys.readouterr().out
    assert registry.aliases(client, "reelforge") == {"champion": "3", "previous": "2"}

    # Rollback: champion back to previous; previous to the champion before that (from the history).
    assert main(["rollback", "reelforge"]) == 0
    out = capsys.readouterr().out
    assert "champion: v3 -> v2" in out and "previous: v2 -> v1" in out
    assert registry.aliases(client, "reelforge") == {"champion": "2", "previous": "1"}
    assert main(["rollback", "reelforge"]) == 0
    assert registry.aliases(client, "reelforge") == {"champion": "1"}  # nothing known before v1
    assert main(["rollback", "reelforge"]) == 2
    assert "has no 'previous' version to roll back to" in capsys.readouterr().err

    assert main(["promote", "reelforge", "--version", "9"]) == 2
    assert "model 'reelforge' has no version '9' (versions: 1, 2, 3, 4)" in capsys.readouterr().err
    assert main(["promote", "nosuchmodel", "--version", "1"]) == 2
    assert "no registered model named 'nosuchmodel'" in capsys.readouterr().err
    assert registry.aliases(client, "reelforge") == {"champion": "1"}
    assert registry.promote(client, "reelforge", "1") == []  # already champion: nothing moves


def test_rollback_without_history_removes_previous(mlflow_uri: str) -> None:
    """Aliases set by hand (no history tag): a rollback restores previous and clears the alias."""
    _versions("reelforge", 2)
    client = tracking.client()
    client.set_registered_model_alias("reelforge", "champion", "2")
    client.set_registered_model_alias("reelforge", "previous", "1")
    moves = registry.rollback(client, "reelforge")
    assert [str(m) for m in moves] == ["champion: v2 -> v1", "previous: v1 -> (none)"]
    with pytest.raises(RegistryError, match="no 'previous' version"):
        registry.rollback(client, "reelforge")


# --- the pyfunc ----------------------------------------------------------------------------------

# Loads a downloaded version with the project's editable install switched off, so `components` and
# `models` can only come from the code shipped inside the version.
ISOLATED_LOAD = """
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in str(getattr(f, "__module__", ""))]
sys.path = [p for p in sys.path if p not in ("", ".")]
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"prompt": ["a cat"]}), params={"frames": 3, "format": "mp4"})
import components, models
shipped = all(m.__file__.startswith(sys.argv[1]) for m in (components, models))
print(out["format"][0], out["frames"][0], "shipped" if shipped else "NOT shipped")
"""


def _decode(row: pd.Series) -> list[np.ndarray]:
    payload = base64.b64decode(row["media_base64"])
    if row["format"] == "mp4":
        import av

        with av.open(io.BytesIO(payload)) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with Image.open(io.BytesIO(payload)) as image:
        assert image.format.lower() == row["format"]
        frames = []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
        return frames


@pytest.mark.slow
def test_registered_pyfunc_serves_images_and_clips_and_refuses_a_pickle(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    client = tracking.client()
    run_id = client.create_run(tracking.ensure_experiment("register-test")).info.run_id
    student = write_model_dir(tmp_path / "student", guidance_embed=True, seed=5)
    registration = register_model_dir("reelforge", student, run_id, {"recipe": "test"})
    assert registration.created and registry.aliases(client, "reelforge") == {"candidate": "1"}

    model = mlflow.pyfunc.load_model(registration.uri)
    params = model.metadata.get_params_schema().to_dict()
    defaults = {p["name"]: p["default"] for p in params}
    assert defaults["steps"] == 2 and defaults["format"] == "auto" and defaults["width"] == 16  # the student's own

    images = model.predict(pd.DataFrame({"prompt": ["a red apple", "a blue car"]}), params={"seed": 7})
    assert list(images.columns) == ["media_base64", "format", "width", "height", "frames"]
    assert images["format"].tolist() == ["png", "png"] and images["frames"].tolist() == [1, 1]
    second = _decode(images.iloc[1])[0]
    assert second.shape == (16, 16, 3)
    # Row i uses seed + i: the second row alone with seed 8 is the same image as in the batch.
    alone = model.predict(pd.DataFrame({"prompt": ["a blue car"]}), params={"seed": 8})
    assert np.array_equal(_decode(alone.iloc[0])[0], second)
    # A negative prompt changes the output (it replaces the empty caption in guidance).
    negative = model.predict(pd.DataFrame({"prompt": ["a blue car"], "negative_prompt": ["blurry"]}),
                             params={"seed": 8})
    assert not np.array_equal(_decode(negative.iloc[0])[0], second)

    for media_format, frames in (("gif", 3), ("mp4", 3), ("webp", 1), ("auto", 3)):
        out = model.predict(pd.DataFrame({"prompt": ["a cat"]}),
                            params={"frames": frames, "format": media_format, "width": 24, "height": 8})
        decoded = _decode(out.iloc[0])
        assert len(decoded) == frames and decoded[0].shape == (8, 24, 3), media_format
        assert out["format"][0] == ("mp4" if media_format == "auto" else media_format)
    with pytest.raises(MlflowException, match="format png holds one image"):
        model.predict(pd.DataFrame({"prompt": ["a cat"]}), params={"frames": 3, "format": "png"})
    with pytest.raises(MlflowException, match="width 10 must be a multiple of 4"):
        model.predict(pd.DataFrame({"prompt": ["a cat"]}), params={"width": 10})

    # The version carries the code it needs: it loads and makes a clip where the project is not importable.
    local = mlflow.artifacts.download_artifacts(artifact_uri=registration.uri, dst_path=str(tmp_path / "copy"))
    isolated = subprocess.run([sys.executable, "-c", ISOLATED_LOAD, local], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert isolated.returncode == 0, isolated.stderr[-3000:]
    assert isolated.stdout.split() == ["mp4", "3", "shipped"]

    # Swap the registered weights for a pickle: loading the version refuses it, naming the file.
    stored = [p for p in (tmp_path / "mlartifacts").rglob("model.safetensors") if "model_dir" in p.parts]
    assert len(stored) == 1
    stored[0].write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(Exception, match="pickle payloads are refused") as refused:
        mlflow.pyfunc.load_model(registration.uri)
    assert "model.safetensors" in str(refused.value)

    # And a model directory holding a pickle is refused before anything is uploaded.
    bad = write_model_dir(tmp_path / "bad", seed=6)
    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(RegisterError, match="pickle payloads are refused"):
        register_model_dir("reelforge", bad, run_id, {})
    assert len(client.search_model_versions("name = 'reelforge'")) == 1
