"""The training pipeline: ingest -> curate -> autoencoder -> pretrain-<stage>... -> quality_tune -> distill -> evaluate -> register -> deploy.

Pretraining is one task per recipe stage (`pretrain.stages`), each continuing from the
previous stage's model, so the KFP UI shows T2I, joint T2I+T2V and higher-resolution stages
as separate tasks with their own logs, metrics and retry.

Every task is a lightweight Python component whose body only calls the stage's runner
(`components.<stage>.component`); the work happens in `components.<stage>.stage.run`. Tasks
run in the project's image with `install_kfp_package=False`, so nothing is pip-installed at
run time (air-gapped clusters work, and kfp.local runs them in the current interpreter).
The recipe travels as one JSON string parameter; its default is the recipe the pipeline was
compiled with, so the KFP UI shows (and lets users edit) the whole recipe.
"""


from collections.abc import Callable  # no `from __future__ import annotations`: KFP reads real annotations

from kfp import dsl

from components.config import Recipe
from pipelines.cluster import component_ops, configure, stage_args
from components.curate.component import curate
from components.deploy.component import deploy
from components.distill.component import distill
from components.evaluate.component import evaluate
from components.ingest.component import ingest
from components.autoencoder.component import autoencoder
from components.pretrain.component import pretrain, pretrain_continue
from components.quality_tune.component import quality_tune
from components.register.component import register

PIPELINE_NAME = "reelforge-training"
STAGE_ORDER = ["ingest", "curate", "autoencoder", "pretrain", "quality_tune", "distill", "evaluate", "register",
               "deploy"]
_FACES = {
    "ingest": ingest,
    "curate": curate,
    "autoencoder": autoencoder,
    "pretrain": pretrain,
    "pretrain_continue": pretrain_continue,
    "quality_tune": quality_tune,
    "distill": distill,
    "evaluate": evaluate,
    "register": register,
    "deploy": deploy,
}


def build_pipeline(recipe: Recipe, image: str | None = None) -> Callable:
    """The training pipeline function for `recipe` (its JSON is the `recipe` parameter default)."""
    ops = component_ops(_FACES, image or recipe.image)
    default_recipe = recipe.to_json()
    # The DAG's shape (one task per pretraining stage) is fixed at compile time from this recipe;
    # a recipe edited in the KFP UI may change values, not the list of stages.
    recipe_obj = recipe

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="reelforge: curate data, train the latent autoencoder, pretrain a flow-matching text-to-image/"
        "video model in stages, quality-tune, distill a few-step student, evaluate against the champion, register "
        "and promote in MLflow, deploy the inference service.",
    )
    def training_pipeline(recipe: str = default_recipe, source: str = "", git_commit: str = "") -> str:
        common = stage_args(recipe, PIPELINE_NAME, git_commit)
        ingest_task = ops["ingest"](source=source, **common).set_display_name("ingest")
        curate_task = ops["curate"](raw_dataset=ingest_task.outputs["raw_dataset"], **common).set_display_name("curate")
        dataset = curate_task.outputs["dataset"]
        latent_task = ops["autoencoder"](dataset=dataset, **common)
        latent_task.set_display_name("autoencoder" if recipe_obj.autoencoder.kind == "vae" else "autoencoder (pixel space)")
        latent = latent_task.outputs["autoencoder"]
        tasks = [ingest_task, curate_task, latent_task]
        previous = None
        for stage in recipe_obj.pretrain.resolved_stages():
            if previous is None:
                task = ops["pretrain"](stage=stage.name, dataset=dataset, autoencoder=latent, **common)
            else:
                task = ops["pretrain_continue"](stage=stage.name, dataset=dataset, autoencoder=latent,
                                                base_model=previous.outputs["model"], **common)
            task.set_display_name(f"pretrain-{stage.name}")
            tasks.append(task)
            previous = task
        pretrained = previous.outputs["model"]
        tune_task = ops["quality_tune"](dataset=dataset, autoencoder=latent, base_model=pretrained, **common)
        tune_task.set_display_name("quality-tune")
        tuned = tune_task.outputs["model"]
        distill_task = ops["distill"](dataset=dataset, autoencoder=latent, tuned=tuned, pretrained=pretrained, **common)
        distill_task.set_display_name("distill")
        student = distill_task.outputs["model"]
        eval_task = ops["evaluate"](dataset=dataset, pretrained=pretrained, tuned=tuned, student=student,
                                    **common).set_display_name("evaluate")
        register_task = ops["register"](student=student, teacher=tuned, dataset=dataset,
                                        evaluation=eval_task.outputs["evaluation"], **common)
        register_task.set_display_name("register")
        deploy_task = ops["deploy"](model_uri=register_task.output, **common).set_display_name("deploy")
        # Cluster settings from recipe.resources (pipelines/cluster.py): requests, GPUs, secrets,
        # retries, timeouts; caching only on curate (ingest reads a mutable source that is not an
        # input artifact; training is not bitwise deterministic on GPUs; register/deploy have side
        # effects). Locally the stage runner caches ingest and curate by content instead.
        stages = ["ingest", "curate", "autoencoder"] + ["pretrain"] * (len(tasks) - 3)
        for task, stage in zip(tasks + [tune_task, distill_task, eval_task, register_task, deploy_task],
                               stages + ["quality_tune", "distill", "evaluate", "register", "deploy"]):
            configure(task, stage, recipe_obj)
        return deploy_task.outputs["Output"]

    return training_pipeline
