"""Quality-tune (Emu): fine-tune the pretrained model on the few highest-quality samples.

Emu's point is that a small set of very good images, at a small learning rate, changes the
look of the outputs without losing what pretraining learnt. Here "very good" is the
weighted rank of curation scores (`quality_tune.scores`, aesthetic and technical quality by
default), at most `quality_tune.per_cluster_cap` per concept cluster, reviewer labels first.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.config import Recipe
from components.curate.aesthetic import review_labels
from components.curate.balance import select_quality_tuning_set
from components.pretrain.stage import training_output
from components.storage import dataset_hash, read_manifest
from components.training import TrainResult, train


def select(manifest: pd.DataFrame, recipe: Recipe) -> pd.DataFrame:
    """Emu's quality-tuning set from the curated manifest: top-k by the configured scores, capped per
    concept cluster, honouring reviewer labels (see `components.curate.balance.select_quality_tuning_set`)."""
    config = recipe.quality_tune
    labels = review_labels(recipe.curate.aesthetic)
    cap = config.per_cluster_cap or None
    if cap is not None and "cluster" not in manifest.columns:
        raise ValueError("quality_tune.per_cluster_cap needs concept clusters: turn on curate.balance.enabled")
    selected = select_quality_tuning_set(manifest, top_k=config.top_k, per_cluster_cap=cap,
                                         score_columns=dict(config.scores), labels=labels)
    if selected.empty:
        raise ValueError("the quality-tuning set is empty: no train samples left after review labels")
    return selected


def run(recipe: Recipe, dataset_dir: Path, base_model_dir: Path, output_dir: Path, tracker) -> tuple[TrainResult, pd.DataFrame]:
    """Fine-tune `base_model_dir` on the selected set; returns the result and the selection."""
    selected = select(read_manifest(dataset_dir), recipe)
    result = train("quality_tune", recipe, recipe.quality_tune, Path(dataset_dir), Path(output_dir), tracker,
                   init_dir=Path(base_model_dir), train_ids=set(selected["id"]),
                   lineage={"dataset_sha256": dataset_hash(dataset_dir), "selected_samples": len(selected)})
    return result, selected


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: tune `inputs['base_model']` on `inputs['dataset']`."""
    result, selected = run(recipe, inputs["dataset"], inputs["base_model"], outputs["model"], tracker)
    selection = Path(outputs["model"]) / "quality_set.parquet"
    columns = [c for c in ["id", "caption", "category", "cluster", "qt_rank", "qt_score", *recipe.quality_tune.scores]
               if c in selected.columns]
    selected[columns].to_parquet(selection, index=False)
    out = training_output("quality_tune", result)
    out.metrics["quality_tune.selected_samples"] = len(selected)
    out.metrics["quality_tune.selected_min_qt_score"] = float(selected["qt_score"].min())
    if "cluster" in selected.columns:
        out.metrics["quality_tune.selected_clusters"] = int(selected["cluster"].nunique())
    out.artifacts.append(selection)
    return out
