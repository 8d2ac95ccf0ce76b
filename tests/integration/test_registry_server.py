"""The model registry under concurrency, on the cluster's setup: `mlflow server` on PostgreSQL with its
artifacts in S3 (a moto server over HTTP), reached by many clients at once.

- 8 registrations at the same time (threads, distinct weights) -> 8 distinct versions, none lost;
- 8 promotes racing on the champion alias -> exactly one champion, and `previous` names a real,
  different version (what a race can and cannot do: components/register/registry.py).
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from components import tracking
from components.register import registry
from components.register.stage import register_model_dir
from tests.conftest import write_model_dir
from tests.integration.conftest import S3_TEST_ENV, mlflow_server, s3_env

pytestmark = pytest.mark.integration
WORKERS = 8


@pytest.fixture(scope="module")
def registry_server(s3_server: str, tmp_path_factory):
    """`mlflow server`: a fresh PostgreSQL database, artifacts proxied into a fresh bucket on moto."""
    import boto3

    bucket = f"reelforge-registry-{uuid.uuid4().hex[:8]}"
    boto3.session.Session(**{k.lower(): v for k, v in S3_TEST_ENV.items() if k != "AWS_DEFAULT_REGION"},
                          region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"]).client(
        "s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("registry-server")
    # Only the server talks to S3 (it proxies artifacts): it alone gets the endpoint and dummy credentials.
    env = {**s3_env(s3_server, tmp=root), "MLFLOW_S3_ENDPOINT_URL": s3_server}
    with mlflow_server(root, f"s3://{bucket}/mlartifacts", env, "reelforge_registry") as url:
        yield url, bucket


@pytest.fixture
def server_uri(registry_server, monkeypatch) -> str:
    url, _ = registry_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    # `models:/` URIs resolve through the registry URI: a value left by an earlier test must not win.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", url)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # the client never reaches S3 itself
    return url


def test_concurrent_registrations_all_get_distinct_versions(server_uri: str, registry_server, tmp_path: Path,
                                                            s3_server: str) -> None:
    import boto3
    import mlflow.pyfunc

    name = f"reelforge-{uuid.uuid4().hex[:6]}"
    client = tracking.client()
    experiment = tracking.ensure_experiment("registry-concurrency")
    model_dirs = [write_model_dir(tmp_path / f"m{i}", guidance_embed=True, seed=100 + i) for i in range(WORKERS)]
    runs = [client.create_run(experiment).info.run_id for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS)

    def register(index: int):
        start.wait()  # all at once: the server allocates version numbers under contention
        return register_model_dir(name, model_dirs[index], runs[index], {"index": str(index)}, smoke_test=False)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(register, range(WORKERS)))
    # MLflow swaps sys.modules["dbutils"] for a mock while it runs our pyfunc's code; unserialized
    # concurrent saves would leave the mock behind for the rest of the process.
    assert "dbutils" not in sys.modules, "MLflow's dbutils mock leaked out of concurrent registrations"

    assert all(r.created for r in results)
    assert sorted(int(r.version) for r in results) == list(range(1, WORKERS + 1))
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == WORKERS
    # Each version holds its own weights: the tag written with it matches the registration's sha256.
    by_version = {v.version: v.tags for v in versions}
    for result in results:
        assert by_version[result.version]["weights.sha256"] == result.weights_sha256
        assert by_version[result.version]["index"] == str(results.index(result))
    assert len({r.weights_sha256 for r in results}) == WORKERS

    # The artifacts went through the server into the bucket, and a version loads back from there.
    _, bucket = registry_server
    s3 = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                               region_name="us-east-1").client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlartifacts/").get("Contents", [])]
    assert sum(k.endswith("model_dir/model.safetensors") for k in keys) == WORKERS
    model = mlflow.pyfunc.load_model(f"models:/{name}/{results[0].version}")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle"]}))
    assert out["format"][0] == "png" and out["frames"][0] == 1


def test_racing_promotes_leave_exactly_one_champion_and_a_real_previous(server_uri: str) -> None:
    name = f"reelforge-{uuid.uuid4().hex[:6]}"
    client = tracking.client()
    run = client.create_run(tracking.ensure_experiment("registry-concurrency"))
    for _ in range(WORKERS + 1):  # metadata-only versions: alias moves never load a model
        registry.create_version(client, name, f"{run.info.artifact_uri}/model", run.info.run_id, {})
    registry.promote(client, name, "1")
    start = threading.Barrier(WORKERS)

    def promote(version: int):
        start.wait()
        return registry.promote(client, name, str(version))

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(promote, range(2, WORKERS + 2)))

    aliases = registry.aliases(client, name)
    champion, previous = aliases["champion"], aliases["previous"]
    assert champion in {str(v) for v in range(2, WORKERS + 2)}  # one of the racers won
    assert previous != champion
    assert client.get_model_version(name, previous).version == previous  # a version that exists
    # Rolling back after the race restores that real version.
    registry.rollback(client, name)
    assert registry.aliases(client, name)["champion"] == previous
    assert os.environ["MLFLOW_TRACKING_URI"] == server_uri
