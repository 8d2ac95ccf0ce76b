"""The curation pipeline: ingest -> ParallelFor over raw shards (score) -> one global merge.

The cluster shape of curation: each raw shard is scored by its own task (decode, clips,
buckets, captions, hashes, OCR/safety/BRISQUE/feature/aesthetic scores), as many at once as
`parallelism` allows. One merge task then does what needs every sample at once: exact,
perceptual and semantic dedup across shards, the thresholds, review labels, split, concept
balancing, and the final shards + report. Its output is the same dataset that the training
pipeline's single `curate` task makes.

Resume: with REELFORGE_CACHE_DIR on a persistent volume in the task environment, a retried or
re-run shard task finds its shard already scored (content-keyed, as in local runs). KFP's own
cache is requested on the shard and merge tasks, but their inputs include the run's job id and
a fresh ingest output, so across runs it does not hit.
"""


from collections.abc import Callable  # no `from __future__ import annotations`: KFP reads real annotations

from kfp import dsl

from components.config import Recipe
from components.curate.component import curate_merge, curate_shard, list_raw_shards
from pipelines.cluster import component_ops, configure, stage_args
from components.ingest.component import ingest

PIPELINE_NAME = "reelforge-curation"


def build_pipeline(recipe: Recipe, image: str | None = None, parallelism: int = 8, fan_in: bool = True) -> Callable:
    """The curation pipeline for `recipe` (its JSON is the `recipe` parameter default).

    `fan_in=False` leaves out the merge task: kfp.local (2.16) runs ParallelFor loops but cannot
    schedule a task that collects a loop's outputs, so `pipelines.local.run_curation` runs the
    loop through kfp.local and then the same merge stage itself. Compiled pipelines always fan in.
    """
    ops = component_ops({"ingest": ingest, "list": list_raw_shards, "shard": curate_shard, "merge": curate_merge},
                        image or recipe.image)
    ingest_op, list_op, shard_op, merge_op = ops["ingest"], ops["list"], ops["shard"], ops["merge"]
    default_recipe = recipe.to_json()
    recipe_obj = recipe  # the pipeline's `recipe` parameter (a JSON string) shadows it inside

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="reelforge: ingest a source and curate it shard-parallel, then merge and dedup globally.")
    def curation_pipeline(recipe: str = default_recipe, source: str = "", git_commit: str = ""):
        common = stage_args(recipe, PIPELINE_NAME, git_commit)
        ingest_task = ingest_op(source=source, **common).set_display_name("ingest")
        configure(ingest_task, "ingest", recipe_obj, cache=False)  # the source is mutable and not an input artifact
        raw = ingest_task.outputs["raw_dataset"]
        shards = configure(list_op(raw_dataset=raw).set_display_name("list shards"), "list_raw_shards", recipe_obj)
        with dsl.ParallelFor(shards.output, parallelism=parallelism) as shard:
            score_task = shard_op(shard=shard, raw_dataset=raw, **common).set_display_name("score shard")
            configure(score_task, "curate_shard", recipe_obj)
        if fan_in:
            merge_task = merge_op(raw_dataset=raw, scored=dsl.Collected(score_task.outputs["scored"]), **common)
            configure(merge_task.set_display_name("merge + dedup"), "curate_merge", recipe_obj)

    return curation_pipeline
