"""Tracking and the registry against a real `mlflow server` on PostgreSQL, as on a cluster.

Starts `mlflow server` with a PostgreSQL backend store (a fresh database per test session) and a
proxied artifact store, then runs stages with MLFLOW_TRACKING_URI=http://...: the same code
path a KFP task on the cluster takes.
"""

from __future__ import annotations

import os
import uuid

import pandas as pd
import pytest

from components import tracking
from components.config import load_recipe
from components.register.stage import register_model_dir
from components.runner import RunContext, execute
from tests.integration.conftest import mlflow_server as start_mlflow_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root, (root / "artifacts").as_uri(), dict(os.environ), "reelforge_test") as url:
        yield url


def test_stages_nest_under_one_parent_and_register_on_the_server(mlflow_server, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("REELFORGE_CACHE_DIR", raising=False)
    source, expected = image_folder
    # The synthetic discs look alike on purpose; keep them all (only exact dedup).
    recipe = load_recipe("tiny", {"ingest.max_samples": None, "curate.min_side": 16, "pretrain.steps": 2,
                                  "curate.dedup.perceptual": False, "curate.dedup.semantic": False,
                                  "pretrain.sample_every": 0, "pretrain.val_every": 0})
    context = RunContext(pipeline_job_id=f"job-{uuid.uuid4().hex[:6]}", pipeline_name="reelforge-training",
                         git_commit="abc123")
    raw = execute("ingest", recipe, {}, {"raw_dataset": tmp_path / "raw"}, context, source=f"folder:{source}")
    curated = execute("curate", recipe, {"raw_dataset": tmp_path / "raw"}, {"dataset": tmp_path / "data"}, context)
    latent = execute("autoencoder", recipe, {"dataset": tmp_path / "data"}, {"autoencoder": tmp_path / "ae"}, context)
    trained = execute("pretrain", recipe, {"dataset": tmp_path / "data", "autoencoder": tmp_path / "ae"},
                      {"model": tmp_path / "model"}, context)

    parent = raw.metadata["mlflow_parent_run_id"]
    assert curated.metadata["mlflow_parent_run_id"] == parent == trained.metadata["mlflow_parent_run_id"]
    assert latent.metadata["mlflow_parent_run_id"] == parent
    client = tracking.client()
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.data.tags["reelforge.stage"] for r in children} == {"ingest", "curate", "autoencoder", "pretrain-t2i_low"}
    assert client.get_run(curated.metadata["mlflow_run_id"]).data.metrics["curate.accepted"] == expected["good"]
    # Artifacts went through the server's proxy into --artifacts-destination.
    assert {"report.html", "report.json"} <= {a.path for a in client.list_artifacts(curated.metadata["mlflow_run_id"])}

    registration = register_model_dir(recipe.register.model_name, tmp_path / "model", trained.metadata["mlflow_run_id"],
                                      {"dataset.sha256": curated.metadata["content_hash"],
                                       "git.commit": context.git_commit})
    version = client.get_model_version_by_alias(recipe.register.model_name, "candidate")
    assert str(version.version) == registration.version
    assert version.tags["dataset.sha256"] == curated.metadata["content_hash"]

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{recipe.register.model_name}@candidate")
    out = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"steps": 2})
    assert len(out) == 1 and out["width"][0] == recipe.curate.resolution

    again = register_model_dir(recipe.register.model_name, tmp_path / "model", trained.metadata["mlflow_run_id"], {})
    assert (again.version, again.created) == (registration.version, False), "same weights, same version"
