"""Compile every pipeline to KFP IR YAML: the files users upload in the KFP UI."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from components.config import Recipe
from pipelines import curation, retraining, training

# name -> builder(recipe, image) of each pipeline this project ships
PIPELINES = {
    training.PIPELINE_NAME: training.build_pipeline,
    curation.PIPELINE_NAME: curation.build_pipeline,
    retraining.PIPELINE_NAME: retraining.build_pipeline,
}


def compile_all(recipe: Recipe, out_dir: Path, image: str | None = None) -> list[Path]:
    """Write `<out_dir>/<pipeline>.yaml` for each pipeline; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, builder in PIPELINES.items():
        path = out_dir / f"{name}.yaml"
        compiler.Compiler().compile(builder(recipe, image=image), package_path=str(path))
        written.append(path)
    return written
