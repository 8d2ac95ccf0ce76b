"""The retraining pipeline: champion -> ingest (new files only) -> curate -> quality-tune -> distill ->
evaluate -> register -> deploy. Scheduled with `reelforge schedule reelforge-retraining --cron ...`.

Each run starts from the registry, not from the last run's files:

- `champion` reads `models:/<register.model_name>@champion`, downloads its teacher (the
  `parent.teacher` lineage tag), the latent codec it was trained in, and the sha256 of every file
  its lineage saw (the curate run's manifest, rejects and, for a retrained champion, the known set
  its own retraining started from; found by the `dataset.sha256` tag);
- `ingest` takes only files whose bytes that dataset has not seen (the rest are listed in
  skipped.parquet with reason `dup_existing`); with nothing new the run fails right there with
  "nothing new to train on", before any GPU is used;
- `curate` runs the full curation on the new files (every filter; exact, perceptual and semantic
  dedup among them, and perceptual and semantic dedup against the champion lineage's samples,
  through the reference the champion stage downloaded);
- `quality-tune` fine-tunes the champion's teacher on the new curated data: Emu's recipe is
  fine-tuning a strong model on a small, high-quality set, and starting from the teacher keeps
  what it learned from the old data; the new data alone is small, so steps stay the recipe's
  quality_tune budget (early stopping guards against overfitting it);
- `distill` makes a new student from the fine-tuned teacher and the champion's teacher (the
  recipe's ensemble weights: `tuned` and `pretrained` sources), because a student fine-tuned
  directly would lose its few-step behaviour;
- `evaluate` compares with the current champion (it always does), `register` registers the
  new student and teacher and promotes only when the gate passes, `deploy` rolls the service.
"""


from collections.abc import Callable  # no `from __future__ import annotations`: KFP reads real annotations

from kfp import dsl

from components.config import Recipe
from components.curate.component import curate
from components.deploy.component import deploy
from components.distill.component import distill
from components.evaluate.component import evaluate
from components.quality_tune.component import quality_tune
from components.register.component import register
from components.retrain.component import champion, ingest_new
from pipelines.cluster import component_ops, configure, stage_args

PIPELINE_NAME = "reelforge-retraining"
_FACES = {"champion": champion, "ingest_new": ingest_new, "curate": curate, "quality_tune": quality_tune,
          "distill": distill, "evaluate": evaluate, "register": register, "deploy": deploy}


def build_pipeline(recipe: Recipe, image: str | None = None) -> Callable:
    """The retraining pipeline function for `recipe` (its JSON is the `recipe` parameter default)."""
    ops = component_ops(_FACES, image or recipe.image)
    default_recipe = recipe.to_json()
    recipe_obj = recipe  # the pipeline's `recipe` parameter (a JSON string) shadows it inside

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="reelforge retraining: take the registry champion's teacher, ingest only new files, curate "
        "them, fine-tune the teacher, distill a new student, evaluate against the champion, register, promote "
        "through the gate, deploy.",
    )
    def retraining_pipeline(recipe: str = default_recipe, source: str = "", git_commit: str = "") -> str:
        common = stage_args(recipe, PIPELINE_NAME, git_commit)
        base = ops["champion"](**common).set_display_name("champion")
        teacher, latent = base.outputs["teacher"], base.outputs["autoencoder"]
        new_raw = ops["ingest_new"](source=source, known=base.outputs["known"], **common)
        new_raw.set_display_name("ingest (new files)")
        curate_task = ops["curate"](raw_dataset=new_raw.outputs["raw_dataset"], **common).set_display_name("curate")
        dataset = curate_task.outputs["dataset"]
        tune = ops["quality_tune"](dataset=dataset, autoencoder=latent, base_model=teacher, **common)
        tune.set_display_name("fine-tune teacher")
        tuned = tune.outputs["model"]
        distill_task = ops["distill"](dataset=dataset, autoencoder=latent, tuned=tuned, pretrained=teacher, **common)
        distill_task.set_display_name("distill")
        student = distill_task.outputs["model"]
        eval_task = ops["evaluate"](dataset=dataset, pretrained=teacher, tuned=tuned, student=student, **common)
        eval_task.set_display_name("evaluate vs champion")
        register_task = ops["register"](student=student, teacher=tuned, dataset=dataset,
                                        evaluation=eval_task.outputs["evaluation"], **common)
        register_task.set_display_name("register")
        deploy_task = ops["deploy"](model_uri=register_task.output, **common).set_display_name("deploy")
        for task, stage in ((base, "champion"), (new_raw, "ingest_new"), (curate_task, "curate"),
                            (tune, "quality_tune"), (distill_task, "distill"), (eval_task, "evaluate"),
                            (register_task, "register"), (deploy_task, "deploy")):
            # The champion moves between runs and ingest reads a mutable source: never cached.
            configure(task, stage, recipe_obj, cache=False if stage in ("champion", "ingest_new") else None)
        return deploy_task.outputs["Output"]

    return retraining_pipeline
