"""Reliability of `reelforge serve` under load and under garbage: a real uvicorn server, real HTTP clients.

- 50 concurrent clients for a bounded time against a tiny model: every request is answered
  (200, or 429 when the queue is full), none with a 5xx or a dropped connection; memory stays
  bounded; /healthz answers afterwards.
- A fuzzed set of malformed requests (bad JSON, wrong types, huge numbers, odd unicode, missing
  fields, wrong content types, negative values, broken HTTP): 4xx only, no traceback or internal
  path in any body.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path

import httpx
import pytest

from components.serve.model_source import ModelSource
from tests.components.test_serve import TRACEBACK_MARKERS, running
from tests.conftest import write_model_dir

pytestmark = pytest.mark.integration

CLIENTS = 50
LOAD_SECONDS = 15.0
RSS_GROWTH_LIMIT_MB = 300  # torch's allocator keeps some memory; a leak per request would pass this quickly


def _rss_mb() -> float:
    """Resident memory of this process (the server runs in it) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _client_loop(url: str, index: int, deadline: float, statuses: list[int], failures: list[str]) -> None:
    """One client: different prompts, seeds and formats back to back until the deadline."""
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        while time.monotonic() < deadline:
            body = {"prompt": f"client {index} asks for a {rng.choice(['red', 'blue', 'green'])} apple",
                    "seed": rng.randrange(1000), "steps": rng.choice([1, 2]),
                    "format": rng.choice(["png", "webp", "gif"])}
            try:
                response = await client.post("/v1/generate", json=body)
            except httpx.HTTPError as error:  # a dropped or refused connection is an unanswered request
                failures.append(f"client {index}: {type(error).__name__}: {error}")
                continue
            statuses.append(response.status_code)
            if response.status_code == 429:
                await asyncio.sleep(0.2)  # a polite client backs off (shorter than Retry-After, to keep pressure)


def test_fifty_concurrent_clients_all_answered_no_5xx_memory_bounded(tmp_path: Path) -> None:
    """50 clients for 15 s: only 200/429, every request answered, RSS growth bounded, /healthz fine after."""
    model_dir = write_model_dir(tmp_path / "model")
    with running(ModelSource(model_dir=model_dir), max_batch=8, batch_wait_ms=5, queue_size=32,
                 request_timeout_s=60) as srv:
        for _ in range(3):  # warm-up: first calls allocate torch's buffers and codec state
            assert srv.generate(prompt="warm up", steps=2, format="gif").status_code == 200
        before = _rss_mb()
        statuses: list[int] = []
        failures: list[str] = []

        async def load() -> None:
            deadline = time.monotonic() + LOAD_SECONDS
            await asyncio.gather(*(_client_loop(srv.url, i, deadline, statuses, failures) for i in range(CLIENTS)))

        started = time.monotonic()
        asyncio.run(load())
        elapsed = time.monotonic() - started
        after = _rss_mb()
        assert srv.client.get("/healthz").status_code == 200
        assert srv.generate(prompt="still there", steps=1).status_code == 200
        metrics = srv.client.get("/metrics").text
    assert not failures, failures[:5]
    assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
    ok = statuses.count(200)
    assert ok >= CLIENTS / 2, f"only {ok} of {len(statuses)} requests succeeded in {elapsed:.0f} s"
    assert after - before < RSS_GROWTH_LIMIT_MB, f"RSS grew {after - before:.0f} MiB ({before:.0f} -> {after:.0f})"
    assert "reelforge_queue_depth 0.0" in metrics  # nothing left behind in the queue
    print(f"{len(statuses)} requests in {elapsed:.1f} s: {ok} x 200, {statuses.count(429)} x 429; "
          f"RSS {before:.0f} -> {after:.0f} MiB")


def _fuzz_cases() -> list[tuple[str, bytes, dict[str, str]]]:
    """(description, body, headers) of malformed generation requests."""
    json_type = {"content-type": "application/json"}
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("empty body", b"", json_type),
        ("bad json", b"{prompt: a}", json_type),
        ("truncated json", b'{"prompt": "a', json_type),
        ("trailing garbage", b'{"prompt": "a"} x', json_type),
        ("invalid utf-8", b'{"prompt": "\xff\xfe"}', json_type),
        ("NaN", b'{"prompt": "a", "guidance": NaN}', json_type),
        ("Infinity", b'{"prompt": "a", "steps": Infinity}', json_type),
        ("deep nesting", b"[" * 3000 + b"]" * 3000, json_type),
        ("too many digits", b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", json_type),
        ("1e400", b'{"prompt": "a", "guidance": 1e400}', json_type),
        ("text/plain", b'{"prompt": "a"}', {"content-type": "text/plain"}),
        ("form", b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}),
        ("no content type", b'{"prompt": "a"}', {}),
    ]
    bodies = [
        None, [], "a", 5, {"prompt": None}, {"prompt": ["a"]}, {"prompt": {"$ne": ""}}, {"prompt": True},
        {"negative_prompt": "only"}, {"prompt": "\ud800"}, {"prompt": "a", "negative_prompt": "\udfff"},
        {"prompt": "a", "steps": -1}, {"prompt": "a", "steps": 10**30}, {"prompt": "a", "steps": "10"},
        {"prompt": "a", "steps": None, "frames": -5}, {"prompt": "a", "width": -16}, {"prompt": "a", "height": 10**12},
        {"prompt": "a", "width": 16.0}, {"prompt": "a", "seed": -1}, {"prompt": "a", "seed": 1.5},
        {"prompt": "a", "seed": "0"}, {"prompt": "a", "guidance": -0.5}, {"prompt": "a", "guidance": "high"},
        {"prompt": "a", "frames": 10**9}, {"prompt": "a", "frames": 2, "format": "png"},
        {"prompt": "a", "format": "exe"}, {"prompt": "a", "format": None, "frames": 0},
        {"prompt": "\u202e\u0645\u0631\u062d\u0628\u0627", "width": 17}, {"prompt": "🎬" * 600},
        {"prompt": "a", "prömpt": "b"}, {"prompt": "a", "__class__": "x"}, {"prompt": "a" * 20000},
    ]
    cases += [(f"json {json.dumps(b, ensure_ascii=True)[:60]}", json.dumps(b).encode(), json_type) for b in bodies]
    return cases


def test_fuzzed_malformed_requests_get_4xx_without_internals(tmp_path: Path) -> None:
    """Every malformed request is refused with a 4xx; no body carries a traceback or a path; the server lives on."""
    model_dir = write_model_dir(tmp_path / "model")
    with running(ModelSource(model_dir=model_dir), max_side=64, max_frames=9, max_steps=16) as srv:
        for name, body, headers in _fuzz_cases():
            response = srv.client.post("/v1/generate", content=body, headers=headers)
            assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text[:300]}"
            for marker in TRACEBACK_MARKERS:
                assert marker not in response.text, f"{name}: {response.text[:300]}"
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            response = srv.client.request(method, "/v1/generate")
            assert response.status_code == 405 and "Traceback" not in response.text
        assert srv.client.get("/../../etc/passwd").status_code == 404
        assert srv.client.get("/v1/model", headers={"authorization": "Bearer \x7f"}).status_code == 200  # no auth set

        # Broken HTTP straight on the socket: uvicorn answers 4xx (or closes), never a 5xx.
        host, port = srv.url.removeprefix("http://").split(":")
        for raw in (b"GARBAGE\r\n\r\n", b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(raw)
                answer = sock.recv(4096)
            status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b""
            assert not status.startswith(b"5"), answer[:200]
            assert b"Traceback" not in answer and b'File "' not in answer

        # Valid but unusual text still works.
        for prompt in ("\u0645\u0631\u062d\u0628\u0627 \U0001F3AC", "tab\tnew\nline", "nul \u0000 char", "ÿ" * 100):
            assert srv.generate(prompt=prompt, steps=1).status_code == 200, prompt
        assert srv.client.get("/healthz").status_code == 200
