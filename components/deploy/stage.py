"""Deploy: put a registered model version behind `reelforge serve`, here or on Kubernetes.

Input: the version the register step made, `models:/<name>/<version>` (an alias URI such as
`models:/<name>@champion` is accepted and resolved to its version).

Which URI the service runs:
- the version is the one `deploy.alias` (champion) points at: the service follows the alias,
  `models:/<name>@champion`. The server polls the registry, so a later promotion or rollback reaches
  it without a redeploy, and each deploy still rolls the pods (their template carries the version).
- otherwise (the gate did not promote it): the exact version, `models:/<name>/<version>`. Locally
  that version is still smoke-tested, and the result says "not promoted: champion unchanged". On
  Kubernetes nothing is applied: the champion's service keeps serving; the manifests of a pinned
  service for that version (object names `<name>-v<version>`) are written for a canary by hand.

Targets:
- local: start `reelforge serve` on a loopback port the OS picks as a subprocess (it inherits
  MLFLOW_TRACKING_URI, so it reads the same registry), wait for /readyz, send one generation
  request with `deploy.smoke_prompt`, check the PNG decodes and the server says it is that version,
  save the image, stop the server (SIGTERM, SIGKILL after `deploy.stop_grace_s`). The server never
  outlives the stage, also when something fails.
- kubernetes: render ServiceAccount, Deployment, Service and HPA (components/deploy/k8s.py), apply
  them with server-side apply and wait for the rollout.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from components import tracking
from components.config import DeployConfig, ServeConfig
from components.deploy import k8s

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")
LOG_TAIL_LINES = 40
USER_PORT = 8080  # the port in the command we print for users


class DeployError(RuntimeError):
    """The deploy failed; the message names the step and, for a local server, ends with its log tail."""

    def __init__(self, message: str, server_pid: int | None = None) -> None:
        super().__init__(message)
        self.server_pid = server_pid  # local: the (stopped) server's process id


@dataclass
class DeployResult:
    """What was deployed, where, and how it answered."""

    target: str  # local | kubernetes
    model_name: str
    version: str
    served_uri: str  # what the service runs: models:/NAME@ALIAS or models:/NAME/VERSION
    promoted: bool  # the version is the one deploy.alias points at
    status: str  # one line for people: "promoted: ..." / "not promoted: champion unchanged ..."
    champion_version: str | None  # what deploy.alias points at (None: no champion yet)
    endpoint: str = ""  # where the service answered (local: gone after the smoke test) or lives (cluster)
    serve_command: str = ""  # the command a user runs to serve it themselves
    smoke_latency_ms: float | None = None
    smoke_png: str = ""  # path of the smoke image (local)
    server_log: str = ""  # path of the local server's log
    server_stop: str = ""  # local: how the server ended (graceful / killed)
    server_pid: int | None = None  # local: the server's process id (gone when the stage returns)
    manifests: str = ""  # path of the rendered YAML (kubernetes, or kubernetes not applied)
    applied: list[str] = field(default_factory=list)  # "Kind namespace/name" applied to the cluster
    rollout: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """A registered version and where the deploy alias points."""

    model_name: str
    version: str
    champion_version: str | None

    @property
    def promoted(self) -> bool:
        """True when the version is the alias's (champion's) version."""
        return self.champion_version == self.version


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`; ValueError naming model_uri."""
    match = _URI.match(model_uri.strip())
    if not match:
        raise ValueError(f"model_uri {model_uri!r} is not a registered model version: expected "
                         "models:/<name>/<version> (what the register step outputs) or models:/<name>@<alias>")
    return match["name"], match["version"], match["alias"]


def resolve(config: DeployConfig, model_uri: str) -> Resolved:
    """Check the version exists in the registry and find which version `config.alias` points at."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(model_uri)
    client = tracking.client()
    try:
        version = client.get_model_version_by_alias(name, alias).version if alias else \
            client.get_model_version(name, version).version
    except MlflowException as error:
        raise DeployError(f"model_uri {model_uri}: not found in the registry at {_redacted(tracking.tracking_uri())}: "
                          f"{error.message}") from None
    try:
        champion = str(client.get_model_version_by_alias(name, config.alias).version)
    except MlflowException:  # no version carries the alias yet
        champion = None
    return Resolved(name, str(version), champion)


def served_uri(config: DeployConfig, resolved: Resolved) -> str:
    """The alias URI when the version is the alias's (the service follows promotions), else the exact version."""
    if resolved.promoted:
        return f"models:/{resolved.model_name}@{config.alias}"
    return f"models:/{resolved.model_name}/{resolved.version}"


def _status(config: DeployConfig, resolved: Resolved) -> str:
    if resolved.promoted:
        return (f"promoted: v{resolved.version} is {config.alias}; "
                f"the service follows models:/{resolved.model_name}@{config.alias}")
    current = (f"{config.alias} is v{resolved.champion_version}" if resolved.champion_version
               else f"no {config.alias} yet")
    return f"not promoted: champion unchanged ({current}); v{resolved.version} served pinned"


def _redacted(uri: str) -> str:
    """`uri` without a password in it (a tracking server URI may carry user:password@)."""
    parsed = urlparse(uri)
    if parsed.password:
        netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
        return urlunparse(parsed._replace(netloc=netloc))
    return uri


def user_serve_command(uri: str, port: int = USER_PORT) -> str:
    """The shell command that serves `uri` on this machine's loopback, with the registry it reads."""
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    prefix = f"MLFLOW_TRACKING_URI={shlex.quote(_redacted(tracking_uri))} " if tracking_uri else ""
    return f"{prefix}reelforge serve --model {shlex.quote(uri)} --host 127.0.0.1 --port {port}"


def run(config: DeployConfig, model_uri: str, out_dir: Path, *, image: str = "", serve: ServeConfig | None = None,
        recipe_name: str = "", log=print) -> DeployResult:
    """Deploy registered version `model_uri` to `config.target`; smoke.png, serve.log, manifests go to `out_dir`.

    Raises DeployError (or ValueError for a malformed URI) naming what failed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolve(config, model_uri)
    uri = served_uri(config, resolved)
    result = DeployResult(target=config.target, model_name=resolved.model_name, version=resolved.version,
                          served_uri=uri, promoted=resolved.promoted, status=_status(config, resolved),
                          champion_version=resolved.champion_version, serve_command=user_serve_command(uri))
    log(f"deploy {config.target}: {resolved.model_name} v{resolved.version}; {result.status}")
    if config.target == "local":
        _deploy_local(config, result, out_dir, serve, log)
    else:
        _deploy_kubernetes(config, result, resolved, out_dir, image, serve, recipe_name, log)
    (out_dir / "deployment.json").write_text(json.dumps(asdict(result), indent=2, sort_keys=True), encoding="utf-8")
    return result


# --- kubernetes --------------------------------------------------------------------------------

def target_for(config: DeployConfig, resolved: Resolved) -> k8s.Target:
    """The Kubernetes service for this version: alias-following when promoted, pinned otherwise."""
    return k8s.Target(resolved.model_name, resolved.version, served_uri(config, resolved),
                      config.alias if resolved.promoted else None)


def render_manifests(config: DeployConfig, model_uri: str, out_dir: Path, image: str,
                     serve: ServeConfig | None = None, recipe_name: str = "") -> Path:
    """Write the manifests for `model_uri` to `out_dir/<object name>.yaml` without touching a cluster."""
    resolved = resolve(config, model_uri)
    target = target_for(config, resolved)
    objects = k8s.render(config, target, image, serve, recipe_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{target.name}.yaml"
    path.write_text(k8s.to_yaml(objects), encoding="utf-8")
    return path


def _deploy_kubernetes(config: DeployConfig, result: DeployResult, resolved: Resolved, out_dir: Path, image: str,
                       serve: ServeConfig | None, recipe_name: str, log) -> None:
    if not image:
        raise DeployError("kubernetes target needs the container image (recipe.image)")
    target = target_for(config, resolved)
    objects = k8s.render(config, target, image, serve, recipe_name)
    manifests = out_dir / f"{target.name}.yaml"
    manifests.write_text(k8s.to_yaml(objects), encoding="utf-8")
    result.manifests = str(manifests)
    result.endpoint = f"http://{target.name}.{config.namespace}.svc.cluster.local:{k8s.SERVICE_PORT}"
    if not resolved.promoted:
        # Applying would replace nothing (pinned objects have their own names) but would start GPU
        # pods for a version the gate rejected; leave that to a person.
        result.status += f"; nothing applied (apply {manifests.name} by hand for a canary)"
        log(result.status)
        return
    result.rollout = k8s.apply(objects, config.rollout_timeout_s, log=log)
    result.applied = [f"{o['kind']} {o['metadata']['namespace']}/{o['metadata']['name']}" for o in objects]
    result.serve_command += (f"   # or on the cluster: kubectl -n {config.namespace} port-forward "
                             f"svc/{target.name} {USER_PORT}:{k8s.SERVICE_PORT}")


# --- local -------------------------------------------------------------------------------------

def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


_READY_LINE = re.compile(r"^serving (?P<name>\S+) v(?P<version>\S+) on (?P<url>http://\S+)")


class LocalServer:
    """`reelforge serve` as a child process in its own process group, always stopped on exit.

    It listens on port 0 (the OS picks a free port, so parallel deploys never race for one) and
    announces `serving <name> v<version> on http://host:port` once the model is loaded.
    """

    def __init__(self, uri: str, log_path: Path, grace_s: float, serve: ServeConfig | None = None) -> None:
        self.uri, self.log_path, self.grace_s = uri, log_path, grace_s
        self.serve = serve
        self.url = ""  # known once the server announces itself
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped_how = ""

    def command(self) -> list[str]:
        """The argv: `reelforge serve` run by this interpreter (the console script may not be on PATH),
        with the recipe's serve section passed on as --set overrides."""
        return [sys.executable, "-m", "pipelines.cli", "serve", "--model", self.uri, "--host", "127.0.0.1",
                "--port", "0", *k8s.serve_args(self.serve or ServeConfig())]

    def __enter__(self) -> LocalServer:
        env = dict(os.environ)
        # The same store and registry as this stage (tracking.client uses the tracking URI for both); a
        # stray MLFLOW_REGISTRY_URI in this process (mlflow.set_registry_uri sets one) must not win.
        env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking.tracking_uri()
        env["PYTHONUNBUFFERED"] = "1"  # the log tail must be current when something fails
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        try:
            # A new session: the server and anything it spawns form one process group we can stop.
            self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as error:
            self._log_file.close()
            raise DeployError(f"local deploy of {self.uri}: cannot start the server: {error}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log_file.close()

    def exited(self) -> int | None:
        """The exit code when the server has ended, else None."""
        return self.process.poll() if self.process else None

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after the grace period; wait until it is gone."""
        process = self.process
        if process is None or self.stopped_how:
            return
        if process.poll() is not None:
            self.stopped_how = f"exited by itself (code {process.returncode})"
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self.grace_s)
            self.stopped_how = "graceful (SIGTERM)"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self.stopped_how = f"killed (SIGKILL after {self.grace_s:g} s)"

    def fail(self, what: str) -> DeployError:
        """A DeployError for `what`, with the server's log tail."""
        return DeployError(f"local deploy of {self.uri}: {what}\n--- server log ({self.log_path}), last lines ---\n"
                           f"{_tail(self.log_path)}", server_pid=self.process.pid if self.process else None)

    def wait_ready(self, timeout_s: float, log) -> None:
        """Wait for the `serving ... on URL` line, then for GET /readyz == 200; fail early if the process exits."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            code = self.exited()
            if code is not None:
                raise self.fail(f"the server exited with code {code} before it was ready")
            if not self.url:
                announced = next((m for m in map(_READY_LINE.match, _tail(self.log_path, 10_000).splitlines()) if m),
                                 None)
                if announced:
                    self.url = announced["url"].rstrip("/")
                    log(announced.group(0))
            if self.url:
                try:
                    if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # a moment between the line and the first answer
            if time.monotonic() > deadline:
                raise self.fail(f"not ready after {timeout_s:g} s (no 'serving ... on http://...' line and "
                                "200 from GET /readyz; deploy.ready_timeout_s)")
            time.sleep(0.25)


def smoke_request(url: str, prompt: str, steps: int | None, timeout_s: float,
                  token: str = "") -> tuple[bytes, dict[str, str], float]:
    """POST one PNG generation request (with the bearer `token` when the server needs one);
    (body, headers, latency in ms). Raises DeployError on a bad answer."""
    import httpx

    body: dict[str, Any] = {"prompt": prompt, "format": "png", "seed": 0}
    if steps is not None:
        body["steps"] = steps
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/generate", json=body, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise DeployError(f"smoke request to {url}/v1/generate got no answer within {timeout_s:g} s "
                          "(deploy.smoke_timeout_s)") from None
    except httpx.HTTPError as error:
        raise DeployError(f"smoke request to {url}/v1/generate failed: {error}") from None
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise DeployError(f"smoke request to {url}/v1/generate answered HTTP {response.status_code}: "
                          f"{response.text[:500]}")
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("image/png"):
        raise DeployError(f"smoke request answered Content-Type {content_type!r}, expected image/png")
    return response.content, dict(response.headers), latency_ms


def check_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG that decodes completely; DeployError when it does not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise DeployError(f"smoke image is {image.format}, not PNG")
            image.load()  # decodes every pixel: a truncated image fails here
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DeployError(f"smoke image ({len(data)} bytes) does not decode as PNG: {error}") from None


def _deploy_local(config: DeployConfig, result: DeployResult, out_dir: Path, serve: ServeConfig | None, log) -> None:
    server_log = out_dir / "serve.log"
    result.server_log = str(server_log)
    server = LocalServer(result.served_uri, server_log, config.stop_grace_s, serve)
    log(f"starting {' '.join(shlex.quote(a) for a in server.command()[:9])} ...")
    with server:
        result.server_pid = server.process.pid if server.process else None
        server.wait_ready(config.ready_timeout_s, log)
        try:
            # The server inherits this environment, so it wants the token this process holds, if any.
            token = os.environ.get((serve or ServeConfig()).auth_token_env, "")
            data, headers, latency_ms = smoke_request(server.url, config.smoke_prompt, config.smoke_steps,
                                                      config.smoke_timeout_s, token)
            width, height = check_png(data)
        except DeployError as error:
            raise server.fail(str(error)) from None
        result.endpoint = server.url
        answered = (headers.get("x-reelforge-model", ""), headers.get("x-reelforge-version", ""))
        if answered != (result.model_name, result.version):
            raise server.fail(f"the server answered as {answered[0] or '?'} v{answered[1] or '?'}, "
                              f"expected {result.model_name} v{result.version}")
    result.server_stop = server.stopped_how
    smoke = out_dir / "smoke.png"
    smoke.write_bytes(data)
    result.smoke_png = str(smoke)
    result.smoke_latency_ms = round(latency_ms, 1)
    log(f"smoke test passed: {width}x{height} PNG for {config.smoke_prompt!r} in {latency_ms:.0f} ms; "
        f"server stopped: {server.stopped_how}")


# --- runner glue -------------------------------------------------------------------------------

def stage(recipe, inputs, outputs, tracker, context, *, model_uri: str = "", **_: object):
    """Tracking glue for the runner: deploy `model_uri` per `recipe.deploy`; smoke image and log go to MLflow."""
    from components.runner import StageOutput

    if not model_uri:
        raise ValueError("deploy needs model_uri (models:/<name>/<version>, the register step's output)")
    out_dir = Path(outputs["deployment"])
    result = run(recipe.deploy, model_uri, out_dir, image=recipe.image, serve=recipe.serve, recipe_name=recipe.name)
    artifacts = [Path(p) for p in (result.smoke_png, result.server_log, result.manifests) if p]
    artifacts.append(out_dir / "deployment.json")
    metrics = {"deploy.promoted": float(result.promoted)}
    if result.smoke_latency_ms is not None:
        metrics["deploy.smoke_latency_ms"] = result.smoke_latency_ms
    metadata: dict[str, Any] = {
        "target": result.target,
        "model_name": result.model_name,
        "version": result.version,
        "served_uri": result.served_uri,
        "promoted": result.promoted,
        "status": result.status,
        "endpoint": result.endpoint,
        "serve_command": result.serve_command,
        **({"smoke_latency_ms": result.smoke_latency_ms} if result.smoke_latency_ms is not None else {}),
        **({"champion_version": result.champion_version} if result.champion_version else {}),
    }
    tags = {"deployed_model": result.model_name, "deployed_version": result.version,
            "deploy.target": result.target, "deploy.status": result.status}
    parent = tracking.find_parent_run(recipe.tracking.experiment, context.pipeline_job_id) if context.pipeline_job_id else None
    metadata["summary"] = json.dumps(run_summary(recipe, result, context.pipeline_job_id, parent), sort_keys=True)
    if parent:  # deploy is the pipeline's last task: the parent run is complete
        tracking.finish_run(parent)
    return StageOutput(metadata=metadata, metrics=metrics, artifacts=artifacts, tags=tags)


def run_summary(recipe, result: DeployResult, pipeline_job_id: str, parent_run_id: str | None) -> dict[str, Any]:
    """What `reelforge run` prints at the end: the registered version, the gate, the service, the metrics.

    Read back from the registry (the version's lineage, gate and metric tags) rather than passed
    along the DAG, so it says what the registry holds. ``created`` is True when this pipeline run
    registered the version (identical weights from an earlier run reuse that run's version).
    """
    client = tracking.client()
    version = client.get_model_version(result.model_name, result.version)
    tags = dict(version.tags)
    aliases = list(getattr(version, "aliases", []) or [])
    summary: dict[str, Any] = {
        "model_name": result.model_name,
        "version": result.version,
        "model_uri": f"models:/{result.model_name}/{result.version}",
        "aliases": aliases,
        "alias": recipe.register.champion_alias if recipe.register.champion_alias in aliases else recipe.register.alias,
        "created": bool(pipeline_job_id) and tags.get("pipeline.run_id") == pipeline_job_id,
        "promoted": result.promoted,
        "gate_passed": tags.get("gate.passed") == "true",
        "gate_reason": tags.get("gate.reason", ""),
        "teacher": tags.get("parent.teacher", ""),
        "dataset_sha256": tags.get("dataset.sha256", ""),
        "deploy_status": result.status,
        "endpoint": result.endpoint,
        "serve_command": result.serve_command,
        **({"smoke_latency_ms": result.smoke_latency_ms} if result.smoke_latency_ms is not None else {}),
        **({"mlflow_parent_run_id": parent_run_id} if parent_run_id else {}),
    }
    for key, value in tags.items():
        if key.startswith("metric."):
            try:
                summary[key] = float(value)
            except ValueError:
                continue
    return summary
