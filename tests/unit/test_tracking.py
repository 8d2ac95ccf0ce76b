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
    assert client.get_run(tracker.run_id).data.tags[tracking.ERROR_TAG] == "RuntimeError: boom"  # why, in the UI
    assert client.get_run(parent).info.status == "FAILED"
    assert tracking.parent_run("exp", "job-1", "parent") == parent, "the parent is found again by job id"


@pytest.fixture(scope="module")
def _migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite database, created once: creating the schema takes seconds per test."""
    import shutil

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
        tracking.ensure_experiment("exp")
    copy = path.with_name("template.db")
    shutil.copyfile(path, copy)
    return copy


@pytest.fixture
def store(_migrated_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow store for this test (a copy of the migrated template)."""
    import shutil

    shutil.copyfile(_migrated_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _stage(name: str = "pretrain"):
    return tracking.stage_run(name, "exp", "tiny", {"a": 1})


def test_training_metrics_are_all_in_mlflow_after_the_stage_with_their_steps(store: str) -> None:
    with _stage() as tracker:
        logger = tracking.training_logger(tracker, linger_s=0.05)
        for step in range(1, 301):
            logger.log_metrics({"train/loss": 1.0 / step, "lr": 1e-4, "bad name!": 2.0}, step=step)
        logger.finalize("success")  # what Lightning calls after fit: the run must stay open
        assert tracking.client().get_run(tracker.run_id).info.status == "RUNNING"
        tracker.log_metrics({"pretrain.val_loss": 0.5})  # the stage logs after fit as before
    client = tracking.client()
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 301)]
    assert len(client.get_metric_history(tracker.run_id, "bad name")) == 300, "names cleaned like MLFlowLogger"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_logging_a_metric_does_not_wait_for_the_store(store: str) -> None:
    import threading

    with _stage() as tracker:
        logger = tracking.training_logger(tracker, linger_s=0.0)
        store_open = threading.Event()
        real_log_batch = logger.writer.client.log_batch

        def stuck_store(*args, **kwargs):
            store_open.wait(30)  # the database hangs until the test lets it go
            return real_log_batch(*args, **kwargs)

        logger.writer.client.log_batch = stuck_store
        logged = threading.Event()

        def train() -> None:
            for step in range(50):
                logger.log_metrics({"train/loss": float(step)}, step=step)
            logged.set()

        threading.Thread(target=train, daemon=True).start()
        # With a synchronous logger the training loop would still be stuck in the first call.
        assert logged.wait(10), "log_metrics blocked on the tracking store"
        assert tracking.client().get_metric_history(tracker.run_id, "train/loss") == []
        store_open.set()
    assert len(tracking.client().get_metric_history(tracker.run_id, "train/loss")) == 50


def test_a_failed_metric_write_fails_the_stage_instead_of_vanishing(store: str) -> None:
    with pytest.raises(tracking.MetricLoggingError, match="3 metric values could not be logged.*disk full"):
        with _stage() as tracker:
            logger = tracking.training_logger(tracker, linger_s=0.0)
            logger.writer.RETRY_DELAYS_S = ()

            def broken_store(*args, **kwargs):
                raise OSError("disk full")

            logger.writer.client.log_batch = broken_store
            logger.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, step=1)
            logger.finalize("success")  # reports, does not raise inside Lightning's teardown
    assert tracking.client().get_run(tracker.run_id).info.status == "FAILED"


def test_a_transient_store_error_is_retried(store: str) -> None:
    with _stage() as tracker:
        logger = tracking.training_logger(tracker, linger_s=0.0)
        logger.writer.RETRY_DELAYS_S = (0.0,)
        real_log_batch, calls = logger.writer.client.log_batch, []

        def flaky_store(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("database is locked")
            return real_log_batch(*args, **kwargs)

        logger.writer.client.log_batch = flaky_store
        logger.log_metrics({"train/loss": 0.25}, step=7)
    [metric] = tracking.client().get_metric_history(tracker.run_id, "train/loss")
    assert (metric.step, metric.value) == (7, 0.25)


def test_lightning_fit_logs_through_the_training_logger(store: str) -> None:
    import lightning
    import torch

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)
    with _stage() as tracker:
        trainer = lightning.Trainer(accelerator="cpu", max_steps=8, logger=tracking.training_logger(tracker),
                                    log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
                                    enable_checkpointing=False)
        trainer.fit(Tiny(), data)
    steps = sorted(m.step for m in tracking.client().get_metric_history(tracker.run_id, "train/loss"))
    assert steps == [1, 3, 5, 7]
    assert tracking.client().get_run(tracker.run_id).info.status == "FINISHED"


def test_video_grid_tiles_every_frame() -> None:
    import numpy as np

    clips = np.zeros((3, 4, 6, 8, 3), dtype=np.uint8)
    for clip in range(3):
        for frame in range(4):
            clips[clip, frame] = 10 * clip + frame
    grid = tracking.video_grid(clips, columns=2, pad=1, upscale=1)
    assert grid.shape == (4, 2 * (6 + 1) + 1, 2 * (8 + 1) + 1, 3)
    assert grid[3, 1, 1, 0] == 3 and grid[3, 1, 10, 0] == 13 and grid[2, 8, 1, 0] == 22
    assert grid[0, 8, 10, 0] == 255, "the empty cell is white"


def test_log_video_writes_an_mp4_and_a_looping_gif_that_decode(store: str, tmp_path: Path) -> None:
    import av
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, size=(2, 5, 16, 16, 3), dtype=np.uint8)
    with _stage() as tracker:
        tracker.log_video(clips, "samples/pretrain_step_000200", fps=8)
    client = tracking.client()
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "samples")) == [
        "samples/pretrain_step_000200.gif", "samples/pretrain_step_000200.mp4"]
    local = Path(client.download_artifacts(tracker.run_id, "samples", str(tmp_path)))
    expected_h, expected_w = 16 * 2 + 2 * 2, 2 * 16 * 2 + 3 * 2  # one row of 2 cells, pad 2, upscale 2
    with av.open(str(local / "pretrain_step_000200.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (expected_h, expected_w, 3)
    with Image.open(local / "pretrain_step_000200.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (expected_w, expected_h)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 120  # 8 fps, in GIF's 10 ms units
