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
from components.training import TrainResult, TrainSpec, train


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


def run(recipe: Recipe, dataset_dir: Path, base_model_dir: Path, output_dir: Path, tracker,
        autoencoder_dir: Path | None = None) -> tuple[TrainResult, pd.DataFrame]:
    """Fine-tune `base_model_dir` on the selected set; returns the result and the selection.

    Images only, at the curated resolution: Emu's quality-tuning set is images. With
    `quality_tune.early_stopping_patience` the run stops when val/loss stops improving, and
    with `average_last` the final weights are the mean of the last validation points' EMA.
    """
    config = recipe.quality_tune
    manifest = read_manifest(dataset_dir)
    if "media" in manifest.columns:
        manifest = manifest[manifest["media"] == "image"]
    selected = select(manifest, recipe)
    spec = TrainSpec(stage="quality_tune", config=config, media=("image",),
                     early_stopping_patience=config.early_stopping_patience, average_last=config.average_last)
    result = train(spec, recipe, Path(dataset_dir), Path(output_dir), tracker,
                   codec_dir=Path(autoencoder_dir) if autoencoder_dir else None,
                   init_dir=Path(base_model_dir), train_ids=set(selected["id"]),
                   lineage={"dataset_sha256": dataset_hash(dataset_dir), "selected_samples": len(selected)})
    return result, selected


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: tune `inputs['base_model']` on `inputs['dataset']`."""
    result, selected = run(recipe, inputs["dataset"], inputs["base_model"], outputs["model"], tracker,
                           autoencoder_dir=inputs.get("autoencoder"))
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
