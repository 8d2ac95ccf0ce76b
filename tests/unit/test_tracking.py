"""Where runs go: SQLite under the work dir by default, MLFLOW_TRACKING_URI when the user set it."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import tracking


def test_default_is_sqlite_under_the_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure(tmp_path / "work")
    assert uri == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    experiment = tracking.ensure_experiment("where-do-artifacts-go")
    location = tracking.client().get_experiment(experiment).artifact_location
    assert location == (tmp_path / "work" / "mlartifacts").resolve().as_uri(), "not ./mlruns of the cwd"


def test_user_tracking_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    assert tracking.configure(tmp_path / "work") == mine
    assert not (tmp_path / "work" / "mlflow.db").exists()


def test_telemetry_is_off_for_children(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DVC_NO_ANALYTICS"):
        monkeypatch.delenv(key, raising=False)
    tracking.quiet_environment()
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["DVC_NO_ANALYTICS"] == "1"


def test_a_failing_stage_marks_its_run_and_the_parent_failed(mlflow_uri: str) -> None:
    parent = tracking.parent_run("exp", "job-1", "parent")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("curate", "exp", "tiny", {"a": 1}, parent_run_id=parent) as tracker:
            raise RuntimeError("boom")
    client = tracking.client()
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    assert tracking.parent_run("exp", "job-1", "parent") == parent, "the parent is found again by job id"
