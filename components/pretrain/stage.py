"""Pretrain: flow-matching training of the text-to-image/video transformer, one recipe stage at a time.

Movie Gen pretrains in stages (T2I at low resolution -> joint T2I + T2V -> higher resolution).
Each entry of `pretrain.stages` is one run of this stage (one KFP task, `pretrain-<name>`):
the first starts from the recipe's model preset, every later one from the previous stage's
weights, in the latent space of the autoencoder stage's output.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.config import Recipe
from components.pretrain import trainjob
from components.storage import dataset_hash
from components.training import TrainResult, TrainSpec, train

_MEDIA = {"image": ("image",), "video": ("video",), "joint": ("image", "video")}


def spec(recipe: Recipe, stage_name: str) -> TrainSpec:
    """The training spec of pretraining stage `stage_name` (the recipe's stage, section values as defaults)."""
    stage = recipe.pretrain.stage(stage_name)
    media = _MEDIA[stage.media]
    return TrainSpec(stage=f"pretrain-{stage.name}", config=recipe.pretrain.train_config(stage.name), media=media,
                     resolution=stage.resolution, frames=stage.frames if "video" in media else 1,
                     video_batch_size=stage.video_batch_size if "video" in media else 0)


def run(recipe: Recipe, dataset_dir: Path, output_dir: Path, tracker, stage_name: str | None = None,
        autoencoder_dir: Path | None = None, base_model_dir: Path | None = None) -> TrainResult:
    """Train one pretraining stage (default: the first) and write the Model artifact to `output_dir`."""
    stages = recipe.pretrain.resolved_stages()
    stage_name = stage_name or stages[0].name
    names = [s.name for s in stages]
    position = names.index(recipe.pretrain.stage(stage_name).name)
    if position > 0 and base_model_dir is None:
        raise ValueError(f"pretrain stage '{stage_name}' continues from stage '{names[position - 1]}': "
                         "pass its model (--base-model)")
    lineage = {"dataset_sha256": dataset_hash(dataset_dir), "pretrain_stage": stage_name,
               "pretrain_stages": names}
    return train(spec(recipe, stage_name), recipe, Path(dataset_dir), Path(output_dir), tracker,
                 codec_dir=Path(autoencoder_dir) if autoencoder_dir else None,
                 init_dir=Path(base_model_dir) if base_model_dir else None, lineage=lineage)


def stage(recipe, inputs, outputs, tracker, context, stage: str = "", input_uris: dict | None = None,
          output_uri: str = "", **_: object):
    """Tracking glue for the runner: train stage `stage` on `inputs['dataset']` into `outputs['model']`.

    A stage with num_nodes > 1 runs as a Kubeflow Trainer TrainJob (components/pretrain/trainjob.py)
    launched from here, except inside that job, whose processes train.
    """
    name = stage or recipe.pretrain.resolved_stages()[0].name
    nodes = recipe.pretrain.train_config(name).num_nodes
    if nodes > 1 and not os.environ.get(trainjob.IN_TRAINJOB_ENV):
        return _multinode(recipe, name, nodes, inputs, outputs, context, input_uris or {}, output_uri)
    result = run(recipe, inputs["dataset"], outputs["model"], tracker, stage_name=stage or None,
                 autoencoder_dir=inputs.get("autoencoder"), base_model_dir=inputs.get("base_model"))
    name = f"pretrain-{stage}" if stage else "pretrain"
    return training_output(name, result)


def _multinode(recipe, name: str, nodes: int, inputs, outputs, context, input_uris: dict, output_uri: str):
    import json

    from components.deploy.k8s import KubernetesDeployError, load_client_config
    from components.runner import StageOutput

    try:
        load_client_config()
    except KubernetesDeployError as error:
        raise trainjob.TrainJobError(
            f"pretrain stage {name!r} asks for num_nodes {nodes}, which runs as a Kubeflow Trainer TrainJob and needs "
            f"a Kubernetes cluster with Kubeflow Trainer v2 installed ({error}); set pretrain.num_nodes: 1 (or the "
            "stage's num_nodes) to train here") from None
    uris = {key: input_uris.get(key, "") for key in inputs}
    job = trainjob.launch(recipe, name, uris, output_uri, Path(outputs["model"]), context.pipeline_job_id,
                          context.commit(), pipeline_name=context.pipeline_name)
    state = json.loads((Path(outputs["model"]) / "state.json").read_text())
    return StageOutput(metadata={"stage": f"pretrain-{name}", "steps": state.get("step", 0), "nodes": nodes,
                                 "trainjob": job["metadata"]["name"], "framework": "pytorch-lightning",
                                 "format": "safetensors"},
                       metrics={f"pretrain-{name}.{k}": float(v) for k, v in (state.get("metrics") or {}).items()
                                if isinstance(v, (int, float))},
                       tags={"trainjob": job["metadata"]["name"]})


def training_output(stage_name: str, result: TrainResult):
    """The runner output shared by the training stages."""
    from components.runner import StageOutput

    metrics = {
        f"{stage_name}.final_train_loss": result.final_train_loss,
        f"{stage_name}.val_loss": result.val_loss,
        f"{stage_name}.frames_per_second": result.images_per_second,
        f"{stage_name}.train_seconds": result.seconds,
        f"{stage_name}.steps": result.steps,
    }
    metadata = {"stage": stage_name, "steps": result.steps, "val_loss": result.val_loss,
                "train_samples": result.train_samples, "framework": "pytorch-lightning", "format": "safetensors"}
    if result.averaged_steps:
        metadata["averaged_steps"] = ",".join(str(s) for s in result.averaged_steps)
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[result.directory / "config.json", result.directory / "state.json"],
                       tags={f"{stage_name}.stopped_early": str(result.stopped_early).lower()})
