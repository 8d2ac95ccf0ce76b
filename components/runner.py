"""Runs one stage the same way from a KFP component, the CLI or a DVC stage.

`execute` opens the stage's MLflow run (nested under the pipeline's parent run when there is
one), logs the resolved recipe section as params, serves deterministic stages from a local
content-addressed cache when one is configured (kfp.local has no caching of its own; on a
cluster KFP's cache does this job), calls the stage, logs its metrics and artifacts, and
returns the metadata that the KFP face copies onto its output artifacts.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from components import tracking
from components.config import Recipe
from components.curate.shard import SHARD_CODE
from components.media import sha256_file
from components.storage import code_fingerprint, directory_hash, sha256_json

CACHE_ENV = "REELFORGE_CACHE_DIR"
GIT_COMMIT_ENV = "REELFORGE_GIT_COMMIT"
# Bump when a deterministic stage's output format or logic changes: old cache entries are
# then never reused.
CACHE_VERSION = "2"
_META_FILE = ".reelforge-stage.json"


@dataclass(frozen=True)
class RunContext:
    """Where a stage runs: which pipeline run, which code."""

    pipeline_job_id: str = ""  # KFP job id; empty when the stage runs alone (CLI, DVC)
    pipeline_name: str = ""  # e.g. reelforge-training
    git_commit: str = ""  # commit of the code; falls back to $REELFORGE_GIT_COMMIT (set in the image)

    def commit(self) -> str:
        """The git commit to record in lineage tags."""
        return self.git_commit or os.environ.get(GIT_COMMIT_ENV, "") or "unknown"


@dataclass
class StageOutput:
    """What a stage returns to the runner."""

    metadata: dict[str, Any] = field(default_factory=dict)  # copied onto the KFP output artifacts
    metrics: dict[str, float] = field(default_factory=dict)  # logged to the stage's MLflow run
    artifacts: list[Path] = field(default_factory=list)  # files/dirs logged to the MLflow run
    tags: dict[str, str] = field(default_factory=dict)  # MLflow tags on the stage run


class StageFn(Protocol):
    """A stage's tracking-aware entry point (`stage()` in each stage package)."""

    def __call__(
        self,
        recipe: Recipe,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
        tracker: tracking.StageTracker,
        context: RunContext,
        **options: Any,
    ) -> StageOutput: ...


@dataclass(frozen=True)
class StageSpec:
    """How the runner treats a stage."""

    module: str  # module with the stage's `run()` and its tracking glue `stage()`
    sections: tuple[str, ...]  # recipe sections that determine its output (params, cache key)
    deterministic: bool  # same inputs + config -> same bytes, so it may be cached
    code: tuple[str, ...] = ()  # modules whose source is part of the cache key (edit one -> re-run)
    entry: str = "stage"  # the tracking-glue function in `module`


_CURATE_CODE = ("components.curate.stage", "components.curate.merge", "components.curate.report",
                "components.curate.balance", "components.storage") + SHARD_CODE

STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("components.ingest.stage", ("ingest",), deterministic=True,
                        code=("components.ingest.stage", "components.ingest.sources", "components.storage")),
    "curate": StageSpec("components.curate.stage", ("curate",), deterministic=True, code=_CURATE_CODE),
    # The two halves of curation for the cluster pipeline's ParallelFor (KFP caches those there).
    "curate_shard": StageSpec("components.curate.stage", ("curate",), deterministic=False, entry="shard_stage"),
    "curate_merge": StageSpec("components.curate.stage", ("curate",), deterministic=False, entry="merge_stage"),
    "autoencoder": StageSpec("components.autoencoder.stage", ("autoencoder",), deterministic=False),
    # One run per pretraining stage: the `stage` option names it (run name pretrain-<stage>).
    "pretrain": StageSpec("components.pretrain.stage", ("model", "text", "pretrain", "evaluate"), deterministic=False),
    "quality_tune": StageSpec("components.quality_tune.stage", ("text", "quality_tune", "evaluate"), deterministic=False),
    "distill": StageSpec("components.distill.stage", ("text", "distill", "evaluate"), deterministic=False),
    # register: the champion it compares with is models:/<register.model_name>@<register.champion_alias>.
    "evaluate": StageSpec("components.evaluate.stage", ("text", "curate", "evaluate", "register"), deterministic=False),
    "register": StageSpec("components.register.stage", ("register",), deterministic=False),
    "deploy": StageSpec("components.deploy.stage", ("deploy", "serve"), deterministic=False),
    # Retraining (pipelines/retraining.py): what the registry's champion was made from, then only new files.
    "champion": StageSpec("components.retrain.stage", ("register",), deterministic=False),
    "ingest_new": StageSpec("components.ingest.stage", ("ingest",), deterministic=False, entry="new_stage"),
}


def _stage_fn(name: str) -> StageFn:
    return getattr(importlib.import_module(STAGES[name].module), STAGES[name].entry)  # type: ignore[no-any-return]


def _cache_key(name: str, recipe: Recipe, inputs: Mapping[str, Path], options: Mapping[str, Any]) -> str:
    spec = STAGES[name]
    payload = {
        "stage": name,
        "version": CACHE_VERSION,
        "config": {s: recipe.model_dump(mode="json")[s] for s in spec.sections},
        "inputs": {k: directory_hash(Path(v)) for k, v in sorted(inputs.items())},
        "options": {k: str(v) for k, v in sorted(options.items())},
        "code": code_fingerprint(spec.code),
    }
    review_dir = recipe.curate.aesthetic.review_dir
    if name.startswith("curate") and review_dir:  # labels re-imported into the same directory change the output
        payload["review"] = {p.name: sha256_file(p) for p in sorted(Path(review_dir).glob("*")) if p.is_file()}
    if name == "ingest":
        from components.ingest.sources import parse_source

        payload["source"] = parse_source(str(options.get("source") or recipe.ingest.source)).fingerprint()
    return sha256_json(payload)


def _copy_tree(source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, destination, dirs_exist_ok=True)


def execute(
    name: str,
    recipe: Recipe,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
    context: RunContext = RunContext(),
    **options: Any,
) -> StageOutput:
    """Run stage `name` with MLflow tracking (and the local cache for deterministic stages)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    spec = STAGES[name]
    tracking.quiet_environment()
    if name == "pretrain" and not options.get("stage"):  # one run per stage: name the first when none is given
        options["stage"] = recipe.pretrain.resolved_stages()[0].name
    if not tracking.is_primary_process():
        return _execute_secondary(name, recipe, inputs, outputs, context, **options)
    parent = None
    if context.pipeline_job_id:
        short = context.pipeline_job_id[-8:]
        parent = tracking.parent_run(
            recipe.tracking.experiment,
            context.pipeline_job_id,
            run_name=f"{context.pipeline_name or 'pipeline'}-{recipe.name}-{short}",
            tags={tracking.RECIPE_TAG: recipe.name, "reelforge.pipeline": context.pipeline_name,
                  "git.commit": context.commit()},
        )
    params = {k: v for s in spec.sections for k, v in recipe.flat_params(s).items()}
    # List options (the merge's scored shard paths) can be long: log their length, not the paths.
    params.update({f"option.{k}": (f"{len(v)} items" if isinstance(v, (list, tuple)) else v) for k, v in options.items()})
    cache_root = os.environ.get(CACHE_ENV)
    key = _cache_key(name, recipe, inputs, options) if (cache_root and spec.deterministic) else None
    started = time.monotonic()
    # A stage that runs once per recipe entry (pretrain-<stage>) is one MLflow run per entry.
    label = f"{name}-{options['stage']}" if options.get("stage") else name
    with tracking.stage_run(label, recipe.tracking.experiment, recipe.name, params, parent_run_id=parent,
                            tags={"git.commit": context.commit()}) as tracker:
        cached = Path(cache_root, name, key) if key else None
        if cached is not None and (cached / _META_FILE).is_file():
            result = _restore(cached, outputs)
            result.tags["reelforge.cache_hit"] = "true"
        else:
            result = _stage_fn(name)(recipe, inputs, outputs, tracker, context, **options)
            if cached is not None:
                _store(cached, outputs, result)
        result.metrics[f"{label}.seconds"] = round(time.monotonic() - started, 3)
        tracker.log_metrics(result.metrics)
        tracker.set_tags({"reelforge.cache_key": key or "", **result.tags})
        for artifact in result.artifacts:
            tracker.log_artifact(artifact)
        result.metadata.setdefault("mlflow_run_id", tracker.run_id)
        if parent:
            result.metadata.setdefault("mlflow_parent_run_id", parent)
    return result


def _execute_secondary(name: str, recipe: Recipe, inputs: Mapping[str, Path], outputs: Mapping[str, Path],
                       context: RunContext, **options: Any) -> StageOutput:
    """A data-parallel worker (rank > 0) of a training stage: it trains alongside rank 0 but opens no
    MLflow run and writes its outputs to a scratch directory, so rank 0's outputs are the only ones."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"reelforge-{name}-rank-") as scratch:
        private = {key: Path(scratch) / key for key in outputs}
        return _stage_fn(name)(recipe, inputs, private, tracking.NullTracker(), context, **options)


def _store(cached: Path, outputs: Mapping[str, Path], result: StageOutput) -> None:
    """Save outputs + result in the cache (via a temp dir, so a crash never leaves half an entry)."""
    temp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    for key, path in outputs.items():
        _copy_tree(Path(path), temp / key)
    record = {
        "metadata": result.metadata,
        "metrics": result.metrics,
        "artifacts": {key: [str(Path(a).relative_to(path)) for a in result.artifacts if Path(a).is_relative_to(path)]
                      for key, path in outputs.items()},
        "tags": result.tags,
    }
    (temp / _META_FILE).write_text(json.dumps(record, default=str), encoding="utf-8")
    shutil.rmtree(cached, ignore_errors=True)
    temp.rename(cached)


def _restore(cached: Path, outputs: Mapping[str, Path]) -> StageOutput:
    record = json.loads((cached / _META_FILE).read_text(encoding="utf-8"))
    artifacts: list[Path] = []
    for key, path in outputs.items():
        _copy_tree(cached / key, Path(path))
        artifacts += [Path(path) / rel for rel in record["artifacts"].get(key, [])]
    return StageOutput(record["metadata"], record["metrics"], artifacts, dict(record["tags"]))


def run_component(
    name: str,
    recipe_json: str,
    pipeline_job_id: str,
    pipeline_name: str,
    git_commit: str,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    metrics_output: Any = None,
    **options: Any,
) -> StageOutput:
    """Body of every KFP component: rebuild the recipe, execute, copy metadata onto outputs.

    `inputs`/`outputs` hold KFP artifact objects (anything with `.path` and `.metadata`);
    outputs are directories. `metrics_output` (a KFP Metrics artifact) receives the metrics.
    """
    recipe = Recipe.from_json(recipe_json)
    context = RunContext(pipeline_job_id=pipeline_job_id, pipeline_name=pipeline_name, git_commit=git_commit)
    result = execute(
        name,
        recipe,
        {k: Path(v.path) for k, v in inputs.items()},
        {k: Path(v.path) for k, v in outputs.items()},
        context,
        **options,
    )
    for artifact in outputs.values():
        artifact.metadata.update({k: v for k, v in result.metadata.items() if isinstance(v, (str, int, float, bool))})
    if metrics_output is not None:
        for key, value in result.metrics.items():
            metrics_output.log_metric(key, float(value))
    return result
