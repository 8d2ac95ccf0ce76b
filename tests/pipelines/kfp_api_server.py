"""A local stand-in for the KFP API server (v2beta1) that checks every request against KFP's published schema.

It serves the few endpoints `kfp.Client` uses to start and schedule runs, on 127.0.0.1 over real
HTTP, and validates each request against `tests/data/kfp_api/kfp_api_single_file.swagger.json`
(the swagger of the KFP release that pairs with our SDK): the path and method must exist, query
parameters must be declared, JSON bodies must match the definition strictly (unknown fields and
wrong types are refused with 400, as grpc-gateway does), and uploads must carry a pipeline YAML.
Every request is recorded so tests can assert on what was sent, or that nothing was.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import yaml

SWAGGER = Path(__file__).parent.parent / "data" / "kfp_api" / "kfp_api_single_file.swagger.json"


def _strict(node: Any) -> Any:
    """The swagger definitions as JSON Schema the way the server reads JSON: no unknown fields; int64 as
    string or number (protobuf's JSON mapping accepts both)."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if node.get("type") == "string" and node.get("format") in ("int64", "uint64"):
            return {"anyOf": [{"type": "string", "pattern": r"^-?\d+$"}, {"type": "integer"}]}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or {"file": text, "filename": name} for uploads


@dataclass
class KfpApiServer:
    """The server's state: what exists, what was asked, and the token it expects (None: no auth)."""

    token: str | None = None
    fail_with: int | None = None  # answer every request with this status (e.g. 401, 503)
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        spec = json.loads(SWAGGER.read_text())
        self._definitions = _strict(spec["definitions"])
        self._routes = []
        for template, operations in spec["paths"].items():
            pattern = re.escape(template)
            pattern = re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[^/:]+)", pattern)
            self._routes.append((re.compile(f"^{pattern}$"), template, operations))
        self._lock = threading.Lock()

    # --- schema checks -------------------------------------------------------------------------
    def check_body(self, schema: dict, body: Any) -> str | None:
        """The first schema violation of `body`, or None."""
        root = {"definitions": self._definitions, **_strict(schema)}
        errors = sorted(jsonschema.Draft4Validator(root).iter_errors(body), key=lambda e: list(e.path))
        if errors:
            error = errors[0]
            return f"{'/'.join(map(str, error.path)) or '(body)'}: {error.message}"
        return None

    def route(self, method: str, path: str) -> tuple[str, dict, dict] | None:
        """(template, operation, path params) of the swagger operation for this request."""
        for pattern, template, operations in self._routes:
            match = pattern.match(path)
            if match and method.lower() in operations:
                return template, operations[method.lower()], match.groupdict()
        return None


def _filter_name(query: dict[str, list[str]]) -> str | None:
    raw = query.get("filter", [None])[0]
    if not raw:
        return None
    for predicate in json.loads(raw).get("predicates", []):
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("string_value") or predicate.get("stringValue")
    return None


def _handler(state: KfpApiServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, {"error": message, "message": message, "code": {400: 3, 401: 16, 404: 5}.get(status, 13)})

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            record = Recorded(method, parts.path, query, {k.lower(): v for k, v in self.headers.items()})
            with state._lock:
                state.requests.append(record)
            if state.fail_with:
                return self._error(state.fail_with, "injected failure")
            if state.token is not None and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._error(401, "Unauthorized: missing or invalid bearer token")
            found = state.route(method, parts.path)
            if found is None:
                return self._error(404, f"no KFP API operation {method} {parts.path}")
            template, operation, params = found
            declared = {p["name"]: p for p in operation.get("parameters", [])}
            for name in query:
                if declared.get(name, {}).get("in") != "query":
                    return self._error(400, f"{method} {template}: unknown query parameter {name!r}")
            body = None
            body_param = next((p for p in declared.values() if p["in"] == "body"), None)
            if body_param is not None:
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    return self._error(400, "body is not JSON")
                problem = state.check_body(body_param["schema"], body)
                if problem:
                    return self._error(400, f"{method} {template}: invalid {body_param['name']}: {problem}")
            if any(p["in"] == "formData" for p in declared.values()):
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
                files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()} \
                    if message.is_multipart() else {}
                if "uploadfile" not in files:
                    return self._error(400, f"{method} {template}: missing form file 'uploadfile'")
                text = files["uploadfile"].get_payload(decode=True).decode()
                try:
                    spec = yaml.safe_load(text)
                    assert spec["pipelineInfo"]["name"] and spec["root"]
                except Exception:  # noqa: BLE001
                    return self._error(400, "uploadfile is not a compiled pipeline")
                body = {"file": text, "filename": files["uploadfile"].get_filename()}
            record.body = body
            with state._lock:
                return self._reply(200, self._answer(method, template, params, query, body))

        def _answer(self, method: str, template: str, params: dict, query: dict, body: Any) -> dict:
            one = lambda q: query.get(q, [None])[0]  # noqa: E731
            new_id = str(uuid.uuid4())
            if template == "/apis/v2beta1/healthz":
                return {"multi_user": True}
            if template == "/apis/v2beta1/experiments":
                if method == "GET":
                    name = _filter_name(query)
                    found = [e for e in state.experiments.values()
                             if e["display_name"] == name and e.get("namespace") == one("namespace")]
                    return {"experiments": found, "total_size": len(found)} if found else {}
                experiment = {**body, "experiment_id": new_id, "storage_state": "AVAILABLE"}
                state.experiments[new_id] = experiment
                return experiment
            if template == "/apis/v2beta1/pipelines":
                name = _filter_name(query)
                found = [p for p in state.pipelines.values() if p["display_name"] == name]
                return {"pipelines": found, "total_size": len(found)} if found else {}
            if template == "/apis/v2beta1/pipelines/upload":
                name = one("name") or one("display_name")
                pipeline = {"pipeline_id": new_id, "name": name, "display_name": one("display_name") or name}
                if one("namespace"):
                    pipeline["namespace"] = one("namespace")
                state.pipelines[new_id] = pipeline
                state.versions[new_id] = [{"pipeline_id": new_id, "pipeline_version_id": str(uuid.uuid4()),
                                           "display_name": name, "name": name}]
                return pipeline
            if template == "/apis/v2beta1/pipelines/upload_version":
                pipeline_id = one("pipelineid")
                if pipeline_id not in state.pipelines:
                    return {}
                version = {"pipeline_id": pipeline_id, "pipeline_version_id": new_id,
                           "display_name": one("name"), "name": one("name")}
                state.versions[pipeline_id].append(version)
                return version
            if template == "/apis/v2beta1/pipelines/{pipeline_id}/versions":
                versions = list(reversed(state.versions.get(params["pipeline_id"], [])))
                page = int(one("page_size") or len(versions))
                return {"pipeline_versions": versions[:page], "total_size": len(versions)}
            if template == "/apis/v2beta1/runs":
                run = {**body, "run_id": new_id, "state": "PENDING"}
                state.runs[new_id] = run
                return run
            if template == "/apis/v2beta1/recurringruns":
                job = {**body, "recurring_run_id": new_id, "status": "ENABLED"}
                state.recurring_runs[new_id] = job
                return job
            return {}

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


class running:  # noqa: N801 - used as a context manager like open()
    """Serve `state` on 127.0.0.1 (ephemeral port) in a thread: `with running(KfpApiServer()) as api: ...`."""

    def __init__(self, state: KfpApiServer) -> None:
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> KfpApiServer:
        self.thread.start()
        self.state.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

