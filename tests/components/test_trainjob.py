"""Multi-node pretraining as a Kubeflow Trainer TrainJob: the manifest validates against the Trainer's CRD,
and the task creates, re-attaches to, follows and collects the job through the real Kubernetes client
talking to a local API server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from components.config import load_recipe
from components.kube.schema import validate_custom
from components.pretrain import trainjob
from components.storage import upload_dir

CRD = Path(__file__).resolve().parents[1] / "data" / "trainer" / "trainer.kubeflow.org_trainjobs.yaml"
IMAGE = "registry.example/reelforge@sha256:" + "d" * 64
INPUTS = {"dataset": "s3://bucket/run/curate/dataset", "autoencoder": "s3://bucket/run/autoencoder/autoencoder"}


@pytest.fixture(scope="module")
def trainjob_crd() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == trainjob.KIND and crd["spec"]["group"] == trainjob.GROUP
    assert trainjob.VERSION in [v["name"] for v in crd["spec"]["versions"]]
    return crd


@pytest.fixture(scope="module")
def manifest() -> dict:
    recipe = load_recipe("cluster")
    return trainjob.build(recipe, "t2i", IMAGE, "reelforge", INPUTS, "s3://bucket/run/pretrain/model-trainjob",
                          pipeline_job_id="run-123", git_commit="abc")


def test_the_two_node_trainjob_validates_against_the_trainer_crd(trainjob_crd, manifest) -> None:
    assert validate_custom([manifest], [trainjob_crd]) == []
    broken = json.loads(json.dumps(manifest))
    broken["spec"]["trainer"]["numNode"] = 2  # a typo the API server would silently drop
    problems = validate_custom([broken], [trainjob_crd])
    assert len(problems) == 1 and "spec/trainer" in problems[0] and "numNode" in problems[0]


def test_the_trainjob_runs_our_image_on_two_gpu_nodes_with_secrets_by_reference(manifest) -> None:
    trainer = manifest["spec"]["trainer"]
    assert manifest["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": "reelforge-torch"}  # infra/k8s/base/trainingruntime.yaml
    assert trainer["image"] == IMAGE and trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == ["torchrun", "-m", "components.pretrain.worker"]
    assert "--input=dataset=s3://bucket/run/curate/dataset" in trainer["args"] and "--stage=t2i" in trainer["args"]
    assert "--pipeline-name=reelforge-training" in trainer["args"]  # the worker's MLflow runs join the task's
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "reelforge-mlflow",
                                                                       "key": "MLFLOW_TRACKING_URI"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "reelforge-s3"
    assert all("value" not in e for name, e in env.items() if name.startswith(("AWS_", "MLFLOW_")))
    (override,) = manifest["spec"]["podTemplateOverrides"]
    assert override["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert override["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert override["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"
    name = manifest["metadata"]["name"]
    assert len(name) <= 63 and name == trainjob.job_name("run-123", "t2i") != trainjob.job_name("run-124", "t2i")


class _FakeCluster:
    """Just enough of the Kubernetes API for trainjobs, over real HTTP: create (409 on a duplicate), get
    (each GET returns the next scripted status), delete."""

    def __init__(self, statuses: list[dict], existing: bool = False, pods: dict | None = None) -> None:
        self.statuses, self.jobs, self.created, self.pods = list(statuses), {}, 0, pods or {}
        self.deleted: list[str] = []
        self.existing = existing
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{body['metadata']['namespace']}/trainjobs"
                name = body["metadata"]["name"]
                if name in state.jobs or state.existing:
                    state.jobs.setdefault(name, body)
                    return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                state.created += 1
                state.jobs[name] = body
                self._send(201, body)

            def do_DELETE(self):  # noqa: N802
                name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
                if state.jobs.pop(name, None) is None:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                state.deleted.append(name)
                self._send(200, {"kind": "Status", "status": "Success"})

            def do_GET(self):  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                if "/api/v1/namespaces/" in self.path and "/pods/" in self.path:
                    if name not in state.pods:
                        return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                    return self._send(200, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                                            "spec": {"containers": state.pods[name]}})
                if name not in state.jobs:
                    return self._send(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                status = state.statuses.pop(0) if len(state.statuses) > 1 else state.statuses[0]
                self._send(200, {**state.jobs[name], "status": status})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api = client.CustomObjectsApi(client.ApiClient(configuration))
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}]}


def _model_dir(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "model" / "state.json").write_text(json.dumps({"step": 7}))
    return root / "model"


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API (moto's server on 127.0.0.1) with an empty bucket `models`; AWS_* point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(key, value)
        import boto3

        boto3.session.Session().client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="models")
        yield "s3://models"
    finally:
        server.stop()


def test_a_completed_job_is_followed_and_its_model_collected(tmp_path: Path, s3_bucket: str) -> None:
    recipe = load_recipe("cluster")
    uploaded = f"{s3_bucket}/run-1/pretrain/model-trainjob"
    assert upload_dir(_model_dir(tmp_path), uploaded) == 2  # what rank 0 does at the end of the job
    lines: list[str] = []
    with _FakeCluster([{}, _condition("Created", "JobsCreated"), _condition("Complete", "JobsCompleted")]) as cluster:
        job = trainjob.launch(recipe, "t2i", INPUTS, uploaded, tmp_path / "out", "run-1", image=IMAGE,
                              api=cluster.api, namespace="reelforge", poll_s=0.01, log=lines.append)
    assert cluster.created == 1 and job["metadata"]["name"] == trainjob.job_name("run-1", "t2i")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "out" / "state.json").is_file()
    assert any("Complete=True JobsCompleted" in line for line in lines)
    with _FakeCluster([_condition("Complete", "JobsCompleted")]) as cluster:  # a job that uploaded nothing
        with pytest.raises(trainjob.TrainJobError, match="completed but left no model.*s3://models/missing"):
            trainjob.launch(recipe, "t2i", INPUTS, f"{s3_bucket}/missing", tmp_path / "none", "run-9", image=IMAGE,
                            api=cluster.api, namespace="reelforge", poll_s=0.01, log=lines.append)


def test_the_job_runs_the_image_of_the_task_pod_else_the_recipe_image(tmp_path: Path, monkeypatch) -> None:
    recipe = load_recipe("cluster")
    uploaded = tmp_path / "bucket" / "model-trainjob"
    upload_dir(_model_dir(tmp_path), str(uploaded))
    monkeypatch.setenv("HOSTNAME", "training-pipeline-pretrain-t2i-pod")
    compiled = "registry.example/reelforge@sha256:" + "e" * 64  # `reelforge compile --image`, not recipe.image
    pods = {"training-pipeline-pretrain-t2i-pod": [{"name": "wait", "image": "kfp-launcher"},
                                                   {"name": "main", "image": compiled}]}
    for served, expected in ((pods, compiled), ({}, recipe.image)):
        with _FakeCluster([_condition("Complete")], pods=served) as cluster:
            job = trainjob.launch(recipe, "t2i", INPUTS, str(uploaded), tmp_path / "out", "run-i", api=cluster.api,
                                  namespace="reelforge", poll_s=0.01, log=lambda _: None)
        assert cluster.jobs[job["metadata"]["name"]]["spec"]["trainer"]["image"] == expected


def test_a_retried_task_reattaches_to_its_running_job(tmp_path: Path) -> None:
    lines: list[str] = []
    with _FakeCluster([_condition("Complete")], existing=True) as cluster:
        manifest = trainjob.build(load_recipe("cluster"), "t2i", IMAGE, "reelforge", INPUTS, "s3://b/o", "run-2")
        trainjob.create_or_attach(cluster.api, manifest, lines.append)
        assert cluster.created == 0 and "exists already" in lines[0]


def test_a_retried_task_replaces_the_job_its_earlier_attempt_left_failed(tmp_path: Path, s3_bucket: str) -> None:
    """KFP retries a failed pretrain task: following the failed job again would fail at once."""
    recipe, lines = load_recipe("cluster"), []
    uploaded = f"{s3_bucket}/run-5/pretrain/model-trainjob"
    upload_dir(_model_dir(tmp_path), uploaded)
    name = trainjob.job_name("run-5", "t2i")
    failed, complete = _condition("Failed", "BackoffLimitExceeded"), _condition("Complete", "JobsCompleted")
    with _FakeCluster([failed, complete]) as cluster:
        cluster.jobs[name] = {"metadata": {"name": name}}  # the first attempt's job
        trainjob.launch(recipe, "t2i", INPUTS, uploaded, tmp_path / "out", "run-5", image=IMAGE, api=cluster.api,
                        namespace="reelforge", poll_s=0.01, log=lines.append)
    assert cluster.deleted == [name] and cluster.created == 1
    assert any("failed on an earlier attempt (BackoffLimitExceeded): deleting it" in line for line in lines)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"


def test_a_failed_job_fails_the_task_with_its_reason(tmp_path: Path) -> None:
    with _FakeCluster([_condition("Failed", "BackoffLimitExceeded", "node-1 exited with code 137")]) as cluster:
        with pytest.raises(trainjob.TrainJobError, match="BackoffLimitExceeded.*exited with code 137"):
            trainjob.launch(load_recipe("cluster"), "t2i", INPUTS, "s3://b/o", tmp_path, "run-3", image=IMAGE,
                            api=cluster.api, namespace="reelforge", poll_s=0.01, log=lambda _: None)


def test_a_job_past_its_timeout_fails_the_task_and_is_left_running() -> None:
    ticks = iter(range(0, 10_000, 60))
    with _FakeCluster([_condition("Created")]) as cluster:
        cluster.jobs["j"] = {"metadata": {"name": "j"}}
        with pytest.raises(trainjob.TrainJobError, match="did not finish within 120 s; it is left running"):
            trainjob.follow(cluster.api, "reelforge", "j", timeout_s=120, poll_s=0, log=lambda _: None,
                            clock=lambda: next(ticks))


def test_without_a_cluster_a_multinode_stage_says_what_it_needs(tmp_path: Path, monkeypatch) -> None:
    from components.pretrain.stage import stage
    from components.runner import RunContext

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    recipe = load_recipe("tiny", {"pretrain.num_nodes": 2, "pretrain.strategy": "ddp"})
    with pytest.raises(trainjob.TrainJobError, match=r"num_nodes 2, .*Kubeflow Trainer.*set pretrain.num_nodes: 1"):
        stage(recipe, {"dataset": tmp_path}, {"model": tmp_path / "model"}, None, RunContext())


def test_the_worker_trains_under_torchrun_and_rank_zero_uploads_the_model(tmp_path: Path) -> None:
    """What each TrainJob node runs, for real: torchrun with two CPU processes (gloo, ddp) on one node."""
    import os
    import subprocess
    import sys

    from models.checkpoint import load_model_dir
    from tests.conftest import curated_discs

    dataset = curated_discs(tmp_path)
    recipe = load_recipe("tiny", {"autoencoder.kind": "pixel", "model.overrides": {}, "pretrain.stages": [],
                                  "pretrain.strategy": "ddp", "pretrain.devices": 2, "pretrain.accelerator": "cpu",
                                  "pretrain.steps": 2, "pretrain.threads": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("REELFORGE_CHECKPOINT_DIR", "REELFORGE_CACHE_DIR")}
    (tmp_path / "scratch").mkdir()
    env.update({trainjob.RECIPE_ENV: recipe.to_json(), trainjob.IN_TRAINJOB_ENV: "1",
                "TMPDIR": str(tmp_path / "scratch"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    uploaded = tmp_path / "bucket" / "model-trainjob"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc-per-node=2", "-m", trainjob.WORKER_MODULE, "--stage=t2i",
                           f"--input=dataset={dataset}", f"--output={uploaded}", "--pipeline-job-id=run-w"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr  # two training processes really joined
    assert done.stdout.count("uploaded 3 files") == 1  # rank 0 alone uploads
    # One download per node: the other process reads the same copy.
    assert done.stdout.count("input dataset: downloaded") == 1
    assert done.stdout.count("input dataset: reusing this node's copy") == 1
    _, config, state = load_model_dir(uploaded)
    assert state["step"] == 2 and config["training"]["pretrain-t2i"]["strategy"] == "ddp"
