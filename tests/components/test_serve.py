"""`reelforge serve`: real uvicorn servers on 127.0.0.1 (port 0), real httpx clients, real codecs, real MLflow.

Each server runs in a thread of the test process (uvicorn.Server over a socket bound to port 0),
so a test pays for loading a tiny model, not for importing torch again; the CLI test starts the
real `reelforge serve` subprocess the deploy stage starts.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from components.config import ServeConfig
from components.serve.app import create_app
from components.serve.model_source import LoadedModel, ModelSource
from tests.conftest import write_model_dir

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0  # loading the text encoder on a busy 2-core machine takes a while
TRACEBACK_MARKERS = ("Traceback", 'File "', "/work/", "site-packages")


@dataclass
class Server:
    """A running server: its URL, the app's shared state and a client."""

    url: str
    state: Any
    client: httpx.Client

    def generate(self, **body: Any) -> httpx.Response:
        """POST /v1/generate with a JSON body."""
        return self.client.post("/v1/generate", json=body)


@contextmanager
def running(source: ModelSource, **limits: Any) -> Iterator[Server]:
    """A real uvicorn server over `source` on a free loopback port, ready (model loaded) when yielded."""
    import uvicorn

    from components.serve.app import bind_socket

    config = ServeConfig(**{"host": "127.0.0.1", "port": 0, **limits})
    app = create_app(source, config)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    client = httpx.Client(base_url=url, timeout=120.0)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert app.state.service.load_error == "", app.state.service.load_error
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.1)
        yield Server(url, app.state.service, client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def assert_clean_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """`status`, a JSON error with a request id, and nothing internal (traceback, paths) in the body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["request_id"] and body["error"]
    for marker in TRACEBACK_MARKERS:
        assert marker not in response.text, response.text
    return body


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of a PNG that decodes completely."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pixel-space model directory (16 px, patch 4: sizes must be multiples of 4)."""
    return write_model_dir(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    """One server for the tests that do not need special limits."""
    with running(ModelSource(model_dir=model_dir), max_batch=4, batch_wait_ms=50, max_frames=9, max_side=32,
                 max_steps=8, max_body_bytes=2048, max_prompt_chars=100) as srv:
        yield srv


def test_png_gif_webp_mp4_decode_with_real_codecs_and_name_the_model(server: Server, model_dir: Path) -> None:
    """Each format comes back as real, decodable media with its Content-Type and the model/version/seed headers."""
    png = server.generate(prompt="a red apple", seed=7, steps=2)
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert png.headers["x-reelforge-model"] == "model"
    assert png.headers["x-reelforge-version"] == server.state.model.version
    assert png.headers["x-reelforge-seed"] == "7"
    pixels = decode_png(png.content)
    assert pixels.shape == (16, 16, 3) and pixels.std() > 0  # a real image, not a blank
    assert server.generate(prompt="a red apple", seed=7, steps=2).content == png.content  # same seed, same image
    assert server.generate(prompt="a red apple", seed=8, steps=2).content != png.content

    wide = server.generate(prompt="a red apple", width=32, height=8, steps=1)
    assert decode_png(wide.content).shape == (8, 32, 3)
    assert int(wide.headers["x-reelforge-seed"]) >= 0  # a seed was drawn and reported

    gif = server.generate(prompt="a blue ball", frames=3, format="gif", steps=1)
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(gif.content)) as image:
        assert image.format == "GIF" and image.n_frames == 3 and image.size == (16, 16)

    webp = server.generate(prompt="a blue ball", format="webp", steps=1)
    assert webp.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(webp.content)) as image:
        assert image.format == "WEBP" and image.size == (16, 16)

    import av

    mp4 = server.generate(prompt="a blue ball", frames=5, steps=1)  # clips default to mp4
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4.content)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)


def test_model_endpoint_health_and_readiness(server: Server) -> None:
    """GET /v1/model describes the model; /healthz and /readyz answer 200 once it is loaded."""
    info = server.client.get("/v1/model").json()
    assert info["name"] == "model" and info["version"] == server.state.model.version
    assert info["default_steps"] == 4 and info["default_guidance"] == 2.0 and info["distilled"] is False
    assert info["size_multiple"] == 4 and info["image_size"] == 16
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x" * 101}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "negative_prompt": "n" * 101}, "negative_prompt"),
    ({"prompt": "a", "width": 18}, "width"),  # not a multiple of 4 (pixel space x patch 4)
    ({"prompt": "a", "width": 64}, "width"),  # above max_side 32
    ({"prompt": "a", "height": 0}, "height"),
    ({"prompt": "a", "height": "16"}, "height"),
    ({"prompt": "a", "frames": 11}, "frames"),  # above max_frames 9
    ({"prompt": "a", "frames": 0}, "frames"),
    ({"prompt": "a", "frames": 3, "format": "png"}, "format"),  # png holds one image
    ({"prompt": "a", "format": "bmp"}, "format"),
    ({"prompt": "a", "steps": 9}, "steps"),  # above max_steps 8
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 2.5}, "steps"),
    ({"prompt": "a", "guidance": -1}, "guidance"),
    ({"prompt": "a", "guidance": 1e308}, "guidance"),
    ({"prompt": "a", "seed": -3}, "seed"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "colour": "red"}, "colour"),  # unknown fields are refused, not ignored
])
def test_invalid_fields_get_422_naming_the_field(server: Server, body: dict[str, Any], field: str) -> None:
    """Every out-of-bounds or mistyped field is refused with 422 and named in the JSON error."""
    response = server.generate(**body)
    error = assert_clean_error(response, 422)
    assert error["field"] == field, error


def test_bad_bodies_get_4xx(server: Server) -> None:
    """Bad JSON -> 400, another content type -> 415, a JSON array -> 422, NaN -> 400."""
    post = server.client.post
    assert_clean_error(post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_clean_error(post("/v1/generate", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}), 415)
    assert_clean_error(post("/v1/generate", json=["a"]), 422)
    assert_clean_error(post("/v1/generate", content=b'{"prompt": "a", "guidance": NaN}',
                            headers={"content-type": "application/json"}), 400)
    assert_clean_error(server.client.get("/v1/generate"), 405)
    assert_clean_error(server.client.get("/nope"), 404)


def test_body_over_the_limit_gets_413_by_header_and_by_bytes(server: Server) -> None:
    """413 when Content-Length says too much, and when a chunked body (no length) turns out too long."""
    big = b'{"prompt": "' + b"a" * 4000 + b'"}'
    assert_clean_error(server.client.post("/v1/generate", content=big,
                                           headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked, with no Content-Length
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"a" * 500
        yield b'"}'

    response = server.client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_clean_error(response, 413)


def test_concurrent_requests_are_batched_and_each_image_depends_only_on_its_seed(model_dir: Path) -> None:
    """4 concurrent compatible requests share model calls; each image equals the one made alone (float noise)."""
    requests = [{"prompt": p, "seed": s, "steps": 2} for p, s in
                [("a red apple", 1), ("a blue ball", 2), ("a green tree", 3), ("a red apple", 4)]]
    with running(ModelSource(model_dir=model_dir), max_batch=4, batch_wait_ms=1500) as srv:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda body: srv.generate(**body), requests))
        batch_sizes = srv.state.metrics.batch_size.collect()[0].samples
        alone = [srv.generate(**body) for body in requests]
    assert all(r.status_code == 200 for r in together + alone)
    total = next(s.value for s in batch_sizes if s.name == "reelforge_batch_size_sum")
    calls = next(s.value for s in batch_sizes if s.name == "reelforge_batch_size_count")
    assert total == 4 and calls < 4, f"{calls} model calls for 4 concurrent requests: nothing was batched"
    for batched, single in zip(together, alone):
        difference = np.abs(decode_png(batched.content).astype(int) - decode_png(single.content).astype(int))
        assert difference.max() <= 2, difference.max()
    assert decode_png(together[0].content).tolist() != decode_png(together[3].content).tolist()  # seeds matter


def test_bearer_token_is_required_when_configured(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """401 without or with a wrong token; the right token works; probes stay open."""
    monkeypatch.setenv("REELFORGE_TEST_TOKEN", "s3cret-token")
    with running(ModelSource(model_dir=model_dir), auth_token_env="REELFORGE_TEST_TOKEN") as srv:
        assert_clean_error(srv.client.get("/v1/model"), 401)
        assert_clean_error(srv.generate(prompt="a"), 401)
        wrong = srv.client.get("/v1/model", headers={"Authorization": "Bearer s3cret-tokeN"})
        assert_clean_error(wrong, 401)
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert "s3cret" not in wrong.text
        right = {"Authorization": "Bearer s3cret-token"}
        assert srv.client.get("/v1/model", headers=right).status_code == 200
        assert srv.client.post("/v1/generate", json={"prompt": "a", "steps": 1}, headers=right).status_code == 200
        assert srv.client.get("/healthz").status_code == 200 and srv.client.get("/readyz").status_code == 200


def test_over_capacity_gets_429_and_slow_requests_504_and_metrics_count_them(model_dir: Path) -> None:
    """A tiny queue refuses the overflow with 429 + Retry-After; a tiny timeout gives 504; /metrics counts it all."""
    with running(ModelSource(model_dir=model_dir), queue_size=1, max_batch=1, batch_wait_ms=0,
                 request_timeout_s=0.5, max_steps=100, max_side=64, max_frames=9) as srv:
        # 50 steps of 5 frames of 32x32 take seconds here: far longer than the 0.5 s timeout.
        body = {"prompt": "a slow one", "steps": 50, "frames": 5, "width": 32, "height": 32, "format": "gif"}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: srv.generate(**body), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 504 in statuses and set(statuses) <= {200, 429, 504}, statuses
        for response in responses:
            if response.status_code == 200:
                continue
            error = assert_clean_error(response, response.status_code)
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
            else:
                assert "request_timeout_s" in error["error"]
        assert srv.client.get("/healthz").status_code == 200  # the loop stayed responsive
        text = srv.client.get("/metrics").text
    assert re.search(r'reelforge_requests_total\{endpoint="/v1/generate",status="429"\} [1-9]', text), text
    assert re.search(r'reelforge_requests_total\{endpoint="/v1/generate",status="504"\} [1-9]', text), text


def test_metrics_exposes_requests_latency_queue_batches_and_model_version(server: Server) -> None:
    """/metrics is Prometheus text with request counts by status, latency, queue depth, batch sizes and the version."""
    assert server.generate(prompt="count me", steps=1).status_code == 200
    server.generate(prompt="a", steps=99)  # 422
    response = server.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'reelforge_requests_total\{endpoint="/v1/generate",status="200"\} [1-9]', text)
    assert re.search(r'reelforge_requests_total\{endpoint="/v1/generate",status="422"\} [1-9]', text)
    assert re.search(r'reelforge_request_latency_seconds_count\{endpoint="/v1/generate"\} [1-9]', text)
    assert "reelforge_queue_depth 0.0" in text
    assert re.search(r"reelforge_batch_size_count [1-9]", text)
    version = server.state.model.version
    assert f'reelforge_model_info{{alias="",distilled="false",name="model",version="{version}"}} 1.0' in text
    assert "reelforge_model_load_failures_total 0.0" in text


class _FailingGenerator:
    """A loaded generator whose model call fails with a message holding an internal path."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def generate_tensor(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError('boom in File "/work/secret/models/dit.py", line 1')


class _FailingSource(ModelSource):
    """A model directory whose generator fails at generation time."""

    def load(self, version: str | None = None) -> LoadedModel:
        loaded = super().load(version)
        loaded.generator = _FailingGenerator(loaded.generator)
        return loaded


def test_internal_errors_get_a_generic_500_with_a_request_id_and_the_traceback_goes_to_the_log(
        model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failing model call answers 500 {error, request_id} without internals; the log has the traceback."""
    with caplog.at_level(logging.ERROR, logger="reelforge.serve"), \
            running(_FailingSource(model_dir=model_dir)) as srv:
        response = srv.client.post("/v1/generate", json={"prompt": "a", "steps": 1},
                                   headers={"X-Request-Id": "req-12345"})
        body = assert_clean_error(response, 500)
        assert body == {"error": "internal error", "request_id": "req-12345"}
        assert "secret" not in response.text
        assert srv.client.get("/healthz").status_code == 200
    assert any("req-12345" in record.getMessage() and record.exc_info for record in caplog.records)


def _register(client: Any, experiment_id: str, name: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Log `model_dir` as artifact model/model_dir of a new run and register it; the version number."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model/model_dir")
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)
    return str(version.version)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow  # ~30-60 s on a busy machine: three registry versions, two background loads
def test_follows_the_registry_alias_and_keeps_the_old_version_when_the_new_one_is_broken(
        tmp_path: Path, mlflow_uri: str) -> None:
    """Moving `champion` swaps the served version without dropping requests; a corrupt version is refused."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from components import tracking

    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient()
    experiment = tracking.ensure_experiment("serve-test")  # artifacts under tmp_path, not the cwd
    name = "reelforge-serve-test"
    client.create_registered_model(name)
    v1 = _register(client, experiment, name, write_model_dir(tmp_path / "v1", seed=0), {"git_commit": "aaa"})
    client.set_registered_model_alias(name, "champion", v1)

    with running(ModelSource(f"models:/{name}@champion"), poll_interval_s=0.3) as srv:
        info = srv.client.get("/v1/model").json()
        assert (info["name"], info["version"], info["alias"]) == (name, v1, "champion")
        assert info["tags"]["git_commit"] == "aaa"
        first = srv.generate(prompt="a red apple", seed=3, steps=2)
        assert first.headers["x-reelforge-version"] == v1

        # Requests keep flowing while v2 loads and is swapped in: none may fail.
        stop = threading.Event()
        answers: list[httpx.Response] = []

        def keep_asking() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as own:
                while not stop.is_set():
                    answers.append(own.post("/v1/generate", json={"prompt": "a red apple", "seed": 3, "steps": 2}))

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            v2 = _register(client, experiment, name, write_model_dir(tmp_path / "v2", seed=1), {"git_commit": "bbb"})
            client.set_registered_model_alias(name, "champion", v2)
            _wait_for(lambda: srv.client.get("/v1/model").json()["version"] == v2, 120, "the swap to v2")
            _wait_for(lambda: any(a.headers.get("x-reelforge-version") == v2 for a in answers), 60,
                      "a request served by v2")
        finally:
            stop.set()
            asker.join(timeout=120)
        assert answers and all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
        served = {a.headers["x-reelforge-version"] for a in answers}
        assert v2 in served
        second = srv.generate(prompt="a red apple", seed=3, steps=2)
        assert second.headers["x-reelforge-version"] == v2
        assert second.content != first.content  # other weights, other image
        assert srv.client.get("/v1/model").json()["tags"]["git_commit"] == "bbb"

        # v3's weights are corrupt: it fails to load, is counted, and v2 keeps serving.
        broken = write_model_dir(tmp_path / "v3", seed=2)
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        v3 = _register(client, experiment, name, broken, {"git_commit": "ccc"})
        client.set_registered_model_alias(name, "champion", v3)
        _wait_for(lambda: srv.state.metrics.load_failures._value.get() >= 1, 60, "the failed load of v3")
        assert "reelforge_model_load_failures_total 1.0" in srv.client.get("/metrics").text
        assert srv.client.get("/v1/model").json()["version"] == v2
        still = srv.generate(prompt="a red apple", seed=3, steps=2)
        assert still.status_code == 200 and still.headers["x-reelforge-version"] == v2


@pytest.mark.slow  # ~20-40 s: a fresh interpreter imports torch and loads the model
def test_cli_serve_prints_the_ready_line_answers_and_stops_on_sigterm(model_dir: Path) -> None:
    """`reelforge serve --model-dir DIR --port 0` prints `serving NAME vVERSION on URL`, serves, shuts down on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--model-dir", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--recipe", "tiny", "--set", "serve.max_batch=2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while url is None:
            line = process.stdout.readline()
            assert line or process.poll() is None, "server exited:\n" + "".join(lines)
            lines.append(line)
            match = re.match(r"serving model v[0-9a-f]{12} on (http://127\.0\.0\.1:\d+)$", line.strip())
            url = match.group(1) if match else None
            assert time.monotonic() < deadline, "".join(lines)
        assert httpx.get(f"{url}/readyz").status_code == 200
        response = httpx.post(f"{url}/v1/generate", json={"prompt": "a red apple", "format": "png"}, timeout=120)
        assert response.status_code == 200 and decode_png(response.content).shape == (16, 16, 3)
        process.send_signal(signal.SIGTERM)
        # uvicorn drains and shuts down, then re-raises the signal it caught (exit status -SIGTERM).
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        rest = process.stdout.read()
        assert "Application shutdown complete" in rest and "Traceback" not in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_serve_refuses_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    """A --model-dir without config.json exits non-zero with a message naming it, before listening for long."""
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--model-dir", str(tmp_path),
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert f"--model-dir {tmp_path}: no config.json" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
