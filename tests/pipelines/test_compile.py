"""The compiled IR is what users upload in the KFP UI: check it loads and says what we mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

from components.config import load_recipe
from pipelines.cli import main
from pipelines.compile import compile_all
from pipelines.training import PIPELINE_NAME, STAGE_ORDER


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ir")
    assert main(["compile", "--recipe", "tiny", "--out", str(out), "--image", "registry.example/reelforge@sha256:" + "a" * 64]) == 0
    path = out / f"{PIPELINE_NAME}.yaml"
    return {"path": path, "spec": yaml.safe_load(path.read_text())}


def test_one_file_per_pipeline_that_kfp_loads(compiled) -> None:
    loaded = kfp_components.load_component_from_file(str(compiled["path"]))
    assert loaded.name == PIPELINE_NAME
    assert {"recipe", "source", "git_commit"} <= set(loaded.component_spec.inputs)


def test_dag_runs_the_stages_in_order_with_one_task_per_pretraining_stage(compiled) -> None:
    tasks = compiled["spec"]["root"]["dag"]["tasks"]
    # tiny has two pretraining stages: the first from scratch, the second continuing from it.
    assert set(tasks) == {"ingest", "curate", "autoencoder", "pretrain", "pretrain-continue", "quality-tune",
                          "distill", "evaluate", "register", "deploy"}
    shown = {name: task["taskInfo"]["name"] for name, task in tasks.items()}
    assert shown["pretrain"] == "pretrain-t2i_low" and shown["pretrain-continue"] == "pretrain-t2i"
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert depends["curate"] == {"ingest"}
    assert depends["autoencoder"] == {"curate"}
    assert depends["pretrain"] == {"curate", "autoencoder"}
    assert depends["pretrain-continue"] == {"curate", "autoencoder", "pretrain"}
    assert depends["quality-tune"] == {"curate", "autoencoder", "pretrain-continue"}
    # The student learns from the tuned and the pretrained model (the demo's teacher ensemble).
    assert depends["distill"] == {"curate", "autoencoder", "pretrain-continue", "quality-tune"}
    assert depends["evaluate"] == {"curate", "pretrain-continue", "quality-tune", "distill"}
    assert depends["register"] == {"curate", "quality-tune", "distill", "evaluate"}
    # deploy serves what register made: the URI is a parameter passed along, the task runs last.
    assert depends["deploy"] == {"register"}
    uri = tasks["deploy"]["inputs"]["parameters"]["model_uri"]["taskOutputParameter"]
    assert uri == {"outputParameterKey": "Output", "producerTask": "register"}
    stage_of = {name: task["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]
                for name, task in tasks.items() if name.startswith("pretrain")}
    assert stage_of == {"pretrain": "t2i_low", "pretrain-continue": "t2i"}


def test_every_component_runs_in_the_project_image_without_installing(compiled) -> None:
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    assert len(executors) == len(STAGE_ORDER) + 1  # pretrain and pretrain_continue are two components
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == "registry.example/reelforge@sha256:" + "a" * 64
        assert "pip install" not in " ".join(container["command"])


def test_artifacts_are_typed_and_the_recipe_is_the_default(compiled) -> None:
    spec = compiled["spec"]
    components = spec["components"]
    outputs = {name: c.get("outputDefinitions", {}).get("artifacts", {}) for name, c in components.items()}
    assert outputs["comp-ingest"]["raw_dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert outputs["comp-curate"]["dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert outputs["comp-pretrain"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outputs["comp-evaluate"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    default = spec["root"]["inputDefinitions"]["parameters"]["recipe"]["defaultValue"]
    assert json.loads(default)["name"] == "tiny"


def test_caching_only_where_outputs_depend_on_inputs_alone(compiled) -> None:
    tasks = compiled["spec"]["root"]["dag"]["tasks"]
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"curate"}


def test_compile_defaults_to_the_recipe_image(tmp_path: Path) -> None:
    recipe = load_recipe("demo")
    path = next(p for p in compile_all(recipe, tmp_path) if p.name == f"{PIPELINE_NAME}.yaml")
    executors = yaml.safe_load(path.read_text())["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {recipe.image}


def test_curation_pipeline_fans_out_over_shards_and_merges_once(tmp_path) -> None:
    from pipelines.curation import PIPELINE_NAME as CURATION

    compile_all(load_recipe("tiny"), tmp_path)
    spec = yaml.safe_load((tmp_path / f"{CURATION}.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    loops = [name for name, task in tasks.items() if "parameterIterator" in task]
    assert len(loops) == 1
    loop = tasks[loops[0]]
    assert loop["parameterIterator"]["items"]["inputParameter"].startswith("pipelinechannel--list-raw-shards")
    assert loop["iteratorPolicy"]["parallelismLimit"] >= 1
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert inner["curate-shard"]["cachingOptions"]["enableCache"] is True  # a retried run skips scored shards
    merge = tasks["curate-merge"]
    assert loops[0] in merge["dependentTasks"]
    assert merge["inputs"]["artifacts"]["scored"]["taskOutputArtifact"]["producerTask"] == loops[0]
    assert tasks["ingest"]["cachingOptions"].get("enableCache") is not True  # the source is mutable
