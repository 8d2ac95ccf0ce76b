"""The champion stage of retraining: what the current champion was made from, as artifacts.

Retraining starts from the registry, not from files on some disk: the champion of
`register.model_name` names its teacher (`parent.teacher` = "<name>-teacher/<version>") and the
dataset it was trained on (`dataset.sha256`, which the curate stage's MLflow run carries with
its manifest and rejects). This stage writes:

- `teacher`: the teacher's model directory (weights, config, state), downloaded from the registry;
- `autoencoder`: the latent codec the teacher was trained in, as an autoencoder-stage directory,
  so new data is encoded in the same latent space;
- `known`: `known.parquet`, the sha256 of every file the champion's lineage saw (kept and
  rejected): its dataset's manifest and rejects, plus, for a champion that was itself retrained,
  the known set its retraining run started from (which curate logs as `known.parquet`), so
  ingest takes only what no ancestor has seen; and the lineage's dedup reference (perceptual
  hashes and embeddings of its accepted samples, `components/curate/reference.py`), so curate
  also rejects re-encoded or resized copies of them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from components.ingest.stage import KNOWN_FILE

CODEC_FILE = "autoencoder.safetensors"


class RetrainError(RuntimeError):
    """The registry has no champion to retrain from, or it lacks the lineage retraining needs."""


def _download_model_dir(client, name: str, version: str, destination: Path) -> Path:
    """The `model_dir` artifact of a registered pyfunc version, copied to `destination`."""
    import mlflow.artifacts

    from components import tracking

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=scratch,
                                                         tracking_uri=tracking.tracking_uri()))
        found = next((p for p in local.rglob("model_dir") if p.is_dir()), None)
        if found is None:
            raise RetrainError(f"models:/{name}/{version} has no model_dir artifact (registered by reelforge?)")
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found, destination, dirs_exist_ok=True)
    return destination


def _codec_dir(model_dir: Path, destination: Path) -> Path:
    """The codec inside a model directory, laid out as the autoencoder stage writes it."""
    from models.checkpoint import WEIGHTS_FILE

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    latent = config.get("latent") or {"kind": "pixel"}
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "config.json").write_text(json.dumps({"latent": latent}, indent=2, sort_keys=True))
    (destination / "state.json").write_text(json.dumps({"stage": "autoencoder", "step": 0, "metrics": {},
                                                        "source": "champion teacher"}))
    if latent.get("kind", "pixel") != "pixel":
        shutil.copyfile(model_dir / CODEC_FILE, destination / WEIGHTS_FILE)
    return destination


def _download(run_id: str, artifact: str, destination: Path) -> Path | None:
    """One artifact of a run, or None when the run has no such artifact."""
    import mlflow.artifacts

    from components import tracking

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                        dst_path=str(destination),
                                                        tracking_uri=tracking.tracking_uri()))
    except Exception:  # noqa: BLE001 - not logged (e.g. a first-generation dataset has no known.parquet)
        return None


def _known_files(client, experiment: str, dataset_sha: str, destination: Path) -> int:
    """sha256 of every file the champion's lineage saw, from the artifacts of its dataset's curate run.

    Also copies the run's dedup reference (curate/reference.py) into `destination`, so curation
    of the new files can reject near and semantic duplicates of the lineage's samples.
    """
    from components import tracking
    from components.curate.merge import REJECTS
    from components.curate.reference import FILES, Reference

    experiment_id = tracking.ensure_experiment(experiment)
    runs = client.search_runs([experiment_id], f"tags.`dataset.sha256` = '{dataset_sha}'", max_results=20)
    hashes: set[str] = set()
    reference: Reference | None = None
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for index, run in enumerate(runs):
            folder = Path(scratch) / str(index)
            for artifact in ("manifest.parquet", REJECTS, KNOWN_FILE):
                path = _download(run.info.run_id, artifact, folder)
                if path is not None:
                    frame = pd.read_parquet(path)
                    if "sha256" in frame:
                        hashes.update(frame["sha256"].dropna().astype(str))
            if reference is None and all(_download(run.info.run_id, name, folder) is not None for name in FILES):
                reference = Reference.load(folder)
        if reference is not None:
            reference.save(destination)
        else:
            print(f"note: no dedup reference was logged with dataset {dataset_sha[:12]}... (curated before reelforge "
                  "logged one): new files are deduplicated against it by exact bytes only", flush=True)
    if not hashes:
        raise RetrainError(f"no curate run in experiment {experiment!r} logged the dataset {dataset_sha[:12]}... "
                           "(manifest.parquet): cannot tell new files from known ones")
    pd.DataFrame({"sha256": sorted(hashes)}).to_parquet(destination / KNOWN_FILE, index=False)
    return len(hashes)


def run(recipe, teacher_dir: Path, autoencoder_dir: Path, known_dir: Path) -> dict[str, str | int]:
    """Materialise the champion's teacher, codec and known files; returns what was found."""
    from components import tracking
    from components.register import registry

    client = tracking.client()
    name, alias = recipe.register.model_name, recipe.register.champion_alias
    version = registry.alias_version(client, name, alias)
    if version is None:
        raise RetrainError(f"model {name!r} has no {alias!r} version in the registry at {tracking.tracking_uri()}: "
                           "run the training pipeline first (reelforge run), or promote a version "
                           f"(reelforge promote {name} --version N)")
    tags = client.get_model_version(name, version).tags
    parent, dataset_sha = tags.get("parent.teacher", ""), tags.get("dataset.sha256", "")
    teacher_name, _, teacher_version = parent.rpartition("/")
    if not teacher_name or not teacher_version or not dataset_sha:
        raise RetrainError(f"{name} v{version} ({alias}) lacks the lineage tags retraining needs "
                           f"(parent.teacher={parent!r}, dataset.sha256={dataset_sha!r})")
    _download_model_dir(client, teacher_name, teacher_version, Path(teacher_dir))
    _codec_dir(Path(teacher_dir), Path(autoencoder_dir))
    known = _known_files(client, recipe.tracking.experiment, dataset_sha, Path(known_dir))
    return {"champion": f"{name}/{version}", "teacher": parent, "dataset_sha256": dataset_sha, "known_files": known}


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: the champion's teacher, codec and known files as output artifacts."""
    from components.runner import StageOutput

    found = run(recipe, outputs["teacher"], outputs["autoencoder"], outputs["known"])
    tracker.set_tags({"retrain.champion": str(found["champion"]), "retrain.teacher": str(found["teacher"])})
    return StageOutput(metadata=found, metrics={"retrain.known_files": float(found["known_files"])})
