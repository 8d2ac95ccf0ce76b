"""`reelforge submit` / `reelforge schedule` against a local KFP API server that checks every request
against KFP's published v2beta1 schema (tests/pipelines/kfp_api_server.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml

from pipelines.cli import main
from pipelines.submit import CronError, validate_cron
from tests.pipelines.kfp_api_server import KfpApiServer, running

TOKEN = "test-token-not-a-secret-0123456789"


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with running(KfpApiServer(token=TOKEN)) as server:
        yield server


def _cli(api: KfpApiServer, verb: str, *extra: str) -> int:
    return main([verb, "reelforge-training", "--recipe", "tiny", "--host", api.url, "--namespace", "team-a", *extra])


def test_submit_starts_one_run_of_our_pipeline_in_the_namespace_with_the_token(api, capsys) -> None:
    assert _cli(api, "submit", "--param", "source=s3://bucket/new", "--experiment", "nightly",
                "--service-account", "reelforge-pipeline") == 0
    out, err = capsys.readouterr()
    runs = [r for r in api.requests if (r.method, r.path) == ("POST", "/apis/v2beta1/runs")]
    assert len(runs) == 1
    run = runs[0].body
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "reelforge-training"
    assert run["runtime_config"]["parameters"] == {"source": "s3://bucket/new"}
    assert run["service_account"] == "reelforge-pipeline"
    experiment = api.experiments[run["experiment_id"]]
    assert experiment["display_name"] == "nightly" and experiment["namespace"] == "team-a"
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api.requests)
    (run_id,) = api.runs
    assert f"run {run_id}: {api.url}/#/runs/details/{run_id}" in out
    assert TOKEN not in out + err


def test_schedule_uploads_then_versions_the_pipeline_and_creates_an_enabled_recurring_run(api, capsys) -> None:
    assert _cli(api, "schedule", "--cron", "0 0 3 * * *", "--job-name", "retrain-nightly",
                "--service-account", "reelforge-pipeline") == 0
    assert _cli(api, "schedule", "--cron", "0 30 2 * * MON-FRI", "--version-name", "v2") == 0
    paths = [(r.method, r.path) for r in api.requests]
    assert paths.count(("POST", "/apis/v2beta1/pipelines/upload")) == 1  # the second is a new version
    uploads = [r for r in api.requests if r.path == "/apis/v2beta1/pipelines/upload_version"]
    assert len(uploads) == 1 and uploads[0].query["name"] == ["v2"]
    assert yaml.safe_load(uploads[0].body["file"])["pipelineInfo"]["name"] == "reelforge-training"
    (pipeline_id,) = api.pipelines
    first, second = api.recurring_runs.values()
    assert first["display_name"] == "retrain-nightly" and first["service_account"] == "reelforge-pipeline"
    assert first["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert second["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * MON-FRI"
    for job in (first, second):
        assert job["mode"] == "ENABLE" and job["no_catchup"] is True and int(job["max_concurrency"]) == 1
        assert job["pipeline_version_reference"]["pipeline_id"] == pipeline_id
    # The second recurring run points at the version it uploaded, not the first one.
    assert second["pipeline_version_reference"]["pipeline_version_id"] == api.versions[pipeline_id][-1][
        "pipeline_version_id"]
    assert TOKEN not in "".join(capsys.readouterr())


@pytest.mark.parametrize("cron, says", [
    ("0 3 * * *", "did you mean '0 0 3 * * *'"),  # crontab's 5 fields
    ("0 0 24 * * *", "hours field: 24 is out of range 0-23"),
    ("0 0 3 * 13 *", "month field: 13 is out of range 1-12"),
    ("0 0 3 ? * SUNDAY", "day of week field: 'SUNDAY' is not a number"),
    ("0 0 3 * * * 2027", "has 7 fields"),
    ("@weekdays", "descriptors are"),
])
def test_a_bad_cron_is_refused_before_anything_is_sent(api, capsys, cron: str, says: str) -> None:
    assert _cli(api, "schedule", "--cron", cron) == 2
    assert says in capsys.readouterr().err
    assert api.requests == []


@pytest.mark.parametrize("cron", ["0 */15 * * * *", "0 0 3 ? * MON-FRI", "30 0 0 1,15 jan-jun *", "0 0 */2 * * 0",
                                  "@daily", "@every 6h30m"])
def test_kfp_cron_forms_are_accepted(cron: str) -> None:
    assert validate_cron(cron) == cron
    with pytest.raises(CronError):
        validate_cron(cron.replace("0", "61", 1) if not cron.startswith("@") else "@every six hours")


def test_a_rejected_token_is_one_clear_line(api, capsys, monkeypatch) -> None:
    monkeypatch.setenv("KFP_TOKEN", "wrong-token")
    assert _cli(api, "submit") == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and api.url in err and "token" in err
    assert "Traceback" not in err and "wrong-token" not in err


def test_the_server_refuses_what_the_schema_does_not_allow(api) -> None:
    """The checks are real: a field the API does not define, or a wrong type, is a 400."""
    def post(body: dict) -> int:
        request = urllib.request.Request(f"{api.url}/apis/v2beta1/runs", json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request).status
        except urllib.error.HTTPError as error:
            return error.code

    assert post({"display_name": "ok", "pipeline_spec": {}}) == 200
    assert post({"display_name": "ok", "pipeline_specification": {}}) == 400
    assert post({"display_name": 7}) == 400
