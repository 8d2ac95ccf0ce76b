"""Pretrain: flow-matching training of the text-to-image transformer on the curated train split."""

from __future__ import annotations

from pathlib import Path

from components.config import Recipe
from components.storage import dataset_hash
from components.training import TrainResult, train


def run(recipe: Recipe, dataset_dir: Path, output_dir: Path, tracker) -> TrainResult:
    """Train from scratch (the recipe's model preset) and write the Model artifact to `output_dir`."""
    return train("pretrain", recipe, recipe.pretrain, Path(dataset_dir), Path(output_dir), tracker,
                 lineage={"dataset_sha256": dataset_hash(dataset_dir)})


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: train on `inputs['dataset']` into `outputs['model']`."""
    result = run(recipe, inputs["dataset"], outputs["model"], tracker)
    return training_output("pretrain", result)


def training_output(stage_name: str, result: TrainResult):
    """The runner output shared by both training stages."""
    from components.runner import StageOutput

    metrics = {
        f"{stage_name}.final_train_loss": result.final_train_loss,
        f"{stage_name}.val_loss": result.val_loss,
        f"{stage_name}.images_per_second": result.images_per_second,
        f"{stage_name}.train_seconds": result.seconds,
    }
    metadata = {"stage": stage_name, "steps": result.steps, "val_loss": result.val_loss,
                "train_samples": result.train_samples, "framework": "pytorch-lightning", "format": "safetensors"}
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[result.directory / "config.json", result.directory / "state.json"])
