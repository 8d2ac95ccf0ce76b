"""The compiled retraining pipeline: champion -> new files -> curate -> fine-tune -> distill -> evaluate ->
register -> deploy, with the cluster settings of every task."""

from __future__ import annotations

import yaml

from pipelines.cli import main

IMAGE = "registry.example/reelforge@sha256:" + "e" * 64


def test_retraining_chains_from_the_champion_and_never_caches_side_effects(tmp_path) -> None:
    assert main(["compile", "--recipe", "cluster", "--out", str(tmp_path), "--image", IMAGE]) == 0
    spec, platform = yaml.safe_load_all((tmp_path / "reelforge-retraining.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    after = {name: set(body.get("dependentTasks", [])) for name, body in tasks.items()}
    assert after == {
        "champion": set(),
        "ingest-new": {"champion"},
        "curate": {"ingest-new"},
        "quality-tune": {"champion", "curate"},
        "distill": {"champion", "curate", "quality-tune"},
        "evaluate": {"champion", "curate", "distill", "quality-tune"},
        "register": {"curate", "distill", "evaluate", "quality-tune"},
        "deploy": {"register"},
    }
    # The fine-tune starts from the champion's teacher, in the champion's latent space.
    tune_inputs = tasks["quality-tune"]["inputs"]["artifacts"]
    assert tune_inputs["base_model"]["taskOutputArtifact"] == {"outputArtifactKey": "teacher", "producerTask": "champion"}
    assert tune_inputs["autoencoder"]["taskOutputArtifact"]["producerTask"] == "champion"
    cached = {name for name, body in tasks.items() if body.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"curate"}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "reelforge-s3" in {s["secretName"] for s in executors["exec-ingest-new"]["secretAsEnv"]}
    assert {s["secretName"] for s in executors["exec-champion"]["secretAsEnv"]} == {"reelforge-mlflow"}
    gpu = spec["deploymentSpec"]["executors"]["exec-quality-tune"]["container"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
