"""Start and schedule pipeline runs on a KFP cluster: `reelforge submit` and `reelforge schedule`.

Both talk to the KFP API (v2beta1) through `kfp.Client`, so the requests are exactly the ones
KFP's own client sends. The pipeline is compiled in-process from the recipe (the same IR that
`reelforge compile` writes) unless a compiled YAML is given.

- submit: find or create the experiment, start one run with the given parameters.
- schedule: upload the pipeline (or, when one with that name exists, a new version of it), then
  create a recurring run on that version: cron trigger, at most one run at a time, no catch-up
  (a cluster that was down does not start a backlog of retraining runs), enabled.

KFP's scheduler uses robfig/cron with a seconds field: an expression has SIX fields, seconds
first (`0 0 3 * * *` is 03:00 daily). The common 5-field crontab form would be misread, so it is
refused here, before anything is sent, with the 6-field form suggested.

The bearer token is read from an environment variable named by the caller (default KFP_TOKEN),
never from a command-line value, so it stays out of shell history, `ps` and logs.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "KFP_TOKEN"
HOST_ENV = "KFP_HOST"
NAMESPACE_ENV = "KFP_NAMESPACE"


class CronError(ValueError):
    """A cron expression KFP's scheduler would refuse or misread."""


class SubmitError(RuntimeError):
    """The KFP API refused a request or could not be reached: one line naming host, action and cause."""


# --- cron ----------------------------------------------------------------------------------------

# (name, low, high, names) per field, in KFP's order: seconds first.
_FIELDS = (
    ("seconds", 0, 59, None),
    ("minutes", 0, 59, None),
    ("hours", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
    ("day of week", 0, 6, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
)
# robfig/cron's predefined schedules, which KFP accepts in place of six fields.
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _value(text: str, field: tuple) -> int:
    name, low, high, names = field
    upper = text.upper()
    if names and upper in names:
        return names[upper]
    if not text.isdigit():
        known = f" or one of {', '.join(names)}" if names else ""
        raise CronError(f"{name} field: {text!r} is not a number{known}")
    number = int(text)
    if not low <= number <= high:
        raise CronError(f"{name} field: {number} is out of range {low}-{high}")
    return number


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression (6 fields, seconds first, or a descriptor); returns it stripped.

    Raises CronError naming the field and the problem; a 5-field crontab line gets the 6-field
    form suggested.
    """
    text = " ".join(expression.split())
    if not text:
        raise CronError("the cron expression is empty")
    if text.startswith("@"):
        if text in _DESCRIPTORS:
            return text
        every, _, duration = text.partition(" ")
        if every == "@every" and _GO_DURATION.match(duration):
            return text
        raise CronError(f"{text!r}: descriptors are {', '.join(sorted(_DESCRIPTORS))} or '@every <duration>' "
                        "(e.g. @every 6h)")
    parts = text.split(" ")
    if len(parts) == 5:
        raise CronError(f"{text!r} has 5 fields, but KFP cron has 6 fields with SECONDS first "
                        f"(second minute hour day-of-month month day-of-week); did you mean '0 {text}'?")
    if len(parts) != 6:
        raise CronError(f"{text!r} has {len(parts)} fields; KFP cron has 6, seconds first "
                        "(second minute hour day-of-month month day-of-week), e.g. '0 0 3 * * *' for 03:00 daily")
    for part, field in zip(parts, _FIELDS):
        name = field[0]
        if part == "?":
            if name not in ("day of month", "day of week"):
                raise CronError(f"{name} field: '?' is only allowed in day of month and day of week")
            continue
        for item in part.split(","):
            base, slash, step = item.partition("/")
            if slash:
                if not step.isdigit() or int(step) == 0:
                    raise CronError(f"{name} field: step {step!r} in {item!r} must be a positive number")
            if base == "*":
                continue
            start, dash, end = base.partition("-")
            if not start:
                raise CronError(f"{name} field: {item!r} is not a value, range, list or step")
            first = _value(start, field)
            if dash and _value(end, field) < first:
                raise CronError(f"{name} field: range {base!r} runs backwards")
    return text


# --- the pipeline package ------------------------------------------------------------------------

def pipeline_package(pipeline: str, recipe: Any, image: str | None, out_dir: Path) -> tuple[Path, str]:
    """(compiled IR YAML, pipeline name) for a pipeline name in PIPELINES or a compiled YAML path."""
    import yaml

    path = Path(pipeline)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SubmitError(f"pipeline file {path} does not exist")
        try:
            spec = yaml.safe_load(path.read_text())
            name = spec["pipelineInfo"]["name"]
        except (yaml.YAMLError, KeyError, TypeError) as error:
            raise SubmitError(f"{path} is not a compiled KFP pipeline (no pipelineInfo.name): {error}") from error
        return path, name
    from kfp import compiler

    from pipelines.compile import PIPELINES

    if pipeline not in PIPELINES:
        raise SubmitError(f"unknown pipeline {pipeline!r}: use one of {', '.join(sorted(PIPELINES))} "
                          "or the path of a compiled pipeline YAML")
    out = Path(out_dir) / f"{pipeline}.yaml"
    compiler.Compiler().compile(PIPELINES[pipeline](recipe, image=image), package_path=str(out))
    return out, pipeline


# --- the KFP API ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Connection:
    """Where and as whom to reach the KFP API."""

    host: str  # e.g. https://kubeflow.example.com/pipeline
    namespace: str | None = None  # the user's profile namespace in multi-user KFP
    token_env: str = TOKEN_ENV  # env var holding the bearer token (empty/unset: no token)
    service_account: str | None = None  # Kubernetes service account the run's pods use (infra/k8s RBAC)

    def client(self) -> Any:
        """A kfp.Client for this host, with the bearer token from the environment."""
        import kfp

        if not self.host:
            raise SubmitError(f"no KFP host: pass --host URL or set ${HOST_ENV}")
        token = os.environ.get(self.token_env) or None
        import warnings

        try:
            with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": we pin a 2.16 server
                warnings.simplefilter("ignore", FutureWarning)
                return kfp.Client(host=self.host, namespace=self.namespace or "kubeflow", existing_token=token)
        except Exception as error:  # noqa: BLE001 - connection set-up errors come in many types
            raise SubmitError(_describe(self.host, "connecting", error)) from None


def _describe(host: str, action: str, error: BaseException) -> str:
    status = getattr(error, "status", None)
    if status is not None:
        body = getattr(error, "body", "") or ""
        try:
            message = json.loads(body).get("message") or json.loads(body).get("error") or body
        except (ValueError, AttributeError):
            message = body
        hint = {401: " (is the token in the token env var valid?)",
                403: " (does this identity have access to the namespace?)"}.get(status, "")
        return f"KFP at {host}: {action} failed: HTTP {status} {getattr(error, 'reason', '')}: " \
               f"{str(message).strip()[:300]}{hint}"
    return f"KFP at {host}: {action} failed: {type(error).__name__}: {str(error)[:300]}"


def _call(connection: Connection, action: str, function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except SubmitError:
        raise
    except Exception as error:  # noqa: BLE001 - ApiException, urllib3 errors, ValueError from kfp
        raise SubmitError(_describe(connection.host, action, error)) from None


@dataclass(frozen=True)
class Submitted:
    """What was created on the cluster."""

    kind: str  # "run" or "recurring run"
    id: str
    url: str  # where to look in the KFP UI
    pipeline_id: str = ""
    version_id: str = ""


def submit(connection: Connection, package: Path, run_name: str, experiment: str,
           params: dict[str, Any]) -> Submitted:
    """Start one run of the compiled pipeline in `experiment` (created if missing)."""
    client = connection.client()
    result = _call(connection, "starting the run", client.create_run_from_pipeline_package, str(package),
                   arguments=params, run_name=run_name, experiment_name=experiment,
                   namespace=connection.namespace, service_account=connection.service_account)
    return Submitted("run", result.run_id, f"{connection.host.rstrip('/')}/#/runs/details/{result.run_id}")


def schedule(connection: Connection, package: Path, pipeline_name: str, job_name: str, experiment: str,
             cron: str, params: dict[str, Any], version_name: str | None = None,
             max_concurrency: int = 1) -> Submitted:
    """Upload the pipeline (or a new version of it) and create an enabled recurring run on that version."""
    cron = validate_cron(cron)  # before anything is sent
    client = connection.client()
    pipeline_id = _call(connection, f"looking up pipeline {pipeline_name!r}", client.get_pipeline_id, pipeline_name)
    version_name = version_name or f"{pipeline_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if pipeline_id is None:
        pipeline = _call(connection, f"uploading pipeline {pipeline_name!r}", client.upload_pipeline, str(package),
                         pipeline_name=pipeline_name, namespace=connection.namespace)
        pipeline_id = pipeline.pipeline_id
        versions = _call(connection, "listing the new pipeline's versions", client.list_pipeline_versions,
                         pipeline_id, page_size=1, sort_by="created_at desc")
        version_id = versions.pipeline_versions[0].pipeline_version_id
    else:
        version = _call(connection, f"uploading version {version_name!r} of pipeline {pipeline_name!r}",
                        client.upload_pipeline_version, str(package), version_name, pipeline_id=pipeline_id)
        version_id = version.pipeline_version_id
    experiment_id = _call(connection, f"finding or creating experiment {experiment!r}", client.create_experiment,
                          experiment, namespace=connection.namespace).experiment_id
    job = _call(connection, "creating the recurring run", client.create_recurring_run, experiment_id, job_name,
                cron_expression=cron, max_concurrency=max_concurrency, no_catchup=True, params=params,
                pipeline_id=pipeline_id, version_id=version_id, enabled=True,
                service_account=connection.service_account)
    return Submitted("recurring run", job.recurring_run_id,
                     f"{connection.host.rstrip('/')}/#/recurringrun/details/{job.recurring_run_id}",
                     pipeline_id, version_id)


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`--param KEY=VALUE` pairs as pipeline arguments."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--param {pair!r}: expected KEY=VALUE, e.g. --param source=s3://bucket/new")
        out[key] = value
    return out

