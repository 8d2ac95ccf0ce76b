"""Integration fixtures: a real S3-compatible server (moto in server mode) over HTTP on loopback.

The server is a separate `moto_server` process, so boto3 in this process, DVC (s3fs) and an
MLflow server, each in their own process, all reach the same buckets over the network, the
way they reach MinIO or AWS. Credentials are dummies set for the test only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
# Dummy values: moto accepts any credentials; these never name a real account.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Anything from the developer's own AWS setup that could leak into a test.
_AWS_VARIABLES_TO_CLEAR = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "MLFLOW_S3_ENDPOINT_URL",
)


def free_port() -> int:
    """A TCP port nothing listens on right now (on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(command: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until `ready_url` answers 200, yield it, and stop it afterwards.

    Fails the test with the end of the server's log when it exits or does not answer in time.
    """
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:  # loopback only
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{Path(command[0]).name} did not start ({ready_url}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextmanager
def mlflow_server(root: Path, artifacts_destination: str, env: dict[str, str], database_prefix: str) -> Iterator[str]:
    """`mlflow server` on a fresh PostgreSQL database (dropped afterwards); yields its URL.

    Artifacts are proxied to `artifacts_destination` (a file: URI or s3://bucket/prefix; `env`
    carries the S3 endpoint and credentials for the server alone). Fails the test with the
    command that starts PostgreSQL when it is down.
    """
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is a test dependency; run `make test`")
    try:
        admin = psycopg2.connect(PG_DSN)
    except psycopg2.OperationalError as error:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({error}); .ci/run starts it: "
                    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    admin.autocommit = True
    database = f"{database_prefix}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(BIN / "mlflow"), "server",
               "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
               "--artifacts-destination", artifacts_destination,
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    try:
        with running_server(command, f"{url}/health", root / "server.log",
                            {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}, timeout=120):
            yield url
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


def s3_env(endpoint: str, base: dict[str, str] | None = None, tmp: Path | None = None) -> dict[str, str]:
    """An environment for a subprocess (or monkeypatch) that talks to `endpoint` with dummy credentials.

    `tmp` points AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE at files that do not exist, so a
    developer's ~/.aws never changes what a test sees.
    """
    env = dict(os.environ if base is None else base)
    for key in _AWS_VARIABLES_TO_CLEAR:
        env.pop(key, None)
    env.update(S3_TEST_ENV)
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    if tmp is not None:
        env["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
    return env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `moto_server` on a free loopback port; yield its endpoint URL (http://127.0.0.1:PORT)."""
    executable = BIN / "moto_server"
    if not executable.exists():
        pytest.fail(f"moto_server is missing next to {sys.executable}: moto[server] is a test dependency (make install)")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    url = f"http://127.0.0.1:{free_port()}"
    port = url.rsplit(":", 1)[1]
    # moto's own endpoint answers once the server is up, without credentials.
    with running_server([str(executable), "-H", "127.0.0.1", "-p", port], f"{url}/moto-api/data.json", log_path,
                        timeout=30):
        yield url


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test server, a client for it, and the endpoint it lives at."""

    name: str
    client: Any  # boto3 S3 client
    endpoint: str


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A new, empty bucket; this test's environment points boto3 at the server with dummy credentials."""
    import boto3

    for key in _AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_env(s3_server, base={}, tmp=tmp_path).items():
        monkeypatch.setenv(key, value)
    name = f"reelforge-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return S3Bucket(name, client, s3_server)
