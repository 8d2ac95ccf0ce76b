"""Quality-tune (Emu): fine-tune the pretrained model on the few highest-quality samples.

Emu's point is that a small set of very good images, at a small learning rate, changes the
look of the outputs without losing what pretraining learnt. Here "very good" is the
curation quality score (`quality_tune.score`), the top `quality_tune.top_k` training samples.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.config import QualityTuneConfig, Recipe
from components.pretrain.stage import training_output
from components.storage import dataset_hash, read_manifest
from components.training import TrainResult, train


def select_top_k(manifest: pd.DataFrame, config: QualityTuneConfig) -> pd.DataFrame:
    """The top-k training samples by the configured score (ties broken by id, so it is stable)."""
    train_rows = manifest[manifest["split"] == "train"]
    if config.score not in train_rows.columns:
        raise ValueError(f"quality_tune.score '{config.score}' is not a manifest column; have {list(train_rows.columns)}")
    ranked = train_rows.sort_values([config.score, "id"], ascending=[False, True])
    return ranked.head(config.top_k)


def run(recipe: Recipe, dataset_dir: Path, base_model_dir: Path, output_dir: Path, tracker) -> tuple[TrainResult, pd.DataFrame]:
    """Fine-tune `base_model_dir` on the selected set; returns the result and the selection."""
    selected = select_top_k(read_manifest(dataset_dir), recipe.quality_tune)
    result = train("quality_tune", recipe, recipe.quality_tune, Path(dataset_dir), Path(output_dir), tracker,
                   init_dir=Path(base_model_dir), train_ids=set(selected["id"]),
                   lineage={"dataset_sha256": dataset_hash(dataset_dir), "selected_samples": len(selected)})
    return result, selected


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: tune `inputs['base_model']` on `inputs['dataset']`."""
    result, selected = run(recipe, inputs["dataset"], inputs["base_model"], outputs["model"], tracker)
    selection = Path(outputs["model"]) / "quality_set.parquet"
    selected[["id", "caption", "category", recipe.quality_tune.score]].to_parquet(selection, index=False)
    out = training_output("quality_tune", result)
    out.metrics["quality_tune.selected_samples"] = len(selected)
    out.metrics["quality_tune.selected_min_score"] = float(selected[recipe.quality_tune.score].min())
    out.artifacts.append(selection)
    return out
