"""Evaluation stage: the untrained floor, clip detection, checks, report, prompt sets (VBench), the registry
champion, A/B results and gate inputs, the model card, and the whole stage through the runner with real MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import tracking
from components.config import load_recipe
from components.evaluate import prompts as prompt_sets
from components.evaluate.modelcard import write_model_card
from components.evaluate.prompts import load_prompts, load_vbench
from components.evaluate.stage import (CHECKS, UNTRAINED, ab_results, clip_frames, comparisons, find_champion,
                                       gate_inputs, untrained_like, write_report)
from components.runner import RunContext, execute
from tests.conftest import curated_discs, write_model_dir
from models.autoencoder import PRESETS as AUTOENCODERS
from models.autoencoder import build as build_autoencoder
from models.dit import DiTConfig, build
from models.generate import TextToImage
from models.latent import AutoencoderCodec
from models.text_encoder import TextEncoder


@pytest.fixture(scope="module")
def trained() -> TextToImage:
    """A tiny latent-space generator whose output layer is not zero (stands in for a trained one)."""
    torch.manual_seed(0)
    codec = AutoencoderCodec(build_autoencoder(AUTOENCODERS["tiny"]).eval(), torch.full((4,), 0.1), torch.full((4,), 2.0))
    config = DiTConfig(image_size=4, in_channels=4, patch_size=2, width=32, depth=1, heads=2, max_text_tokens=8)
    model = build(config).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.5)
    return TextToImage(model, TextEncoder(max_tokens=8), {"model": config.to_dict()}, {}, codec=codec)


def test_untrained_floor_samples_are_decoded_starting_noise(trained: TextToImage) -> None:
    """The floor is the same architecture behind the same codec, and what it makes is the decoded
    latent noise the sampler starts from (adaLN-zero predicts zero velocity), not pixel noise."""
    floor = untrained_like(trained, seed=0)
    assert floor.codec is trained.codec and floor.model.config == trained.model.config
    prompts = ["a red apple", "a dog on grass"]
    images = floor.generate_tensor(prompts, steps=3, guidance=2.0, seed=7)
    assert images.shape == (2, 3, 8, 8)  # 4x4 latent cells, 2x spatial codec
    start = torch.randn((2, 4, 1, 4, 4), generator=torch.Generator().manual_seed(7))
    expected = trained.codec.decode(start)[:, :, 0].clamp(-1, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # A generator that moves the latents makes something else from the same noise.
    assert (trained.generate_tensor(prompts, steps=3, guidance=2.0, seed=7) - expected).abs().max() > 1e-2


def test_clip_frames_follows_what_the_generator_trained_on() -> None:
    """Its own clip training first, then a video/joint pretraining stage in its recipe; images only -> None."""
    assert clip_frames({"data": {"media": ["image", "video"], "frames": 17}}) == 17
    joint = {"data": {"media": ["image"], "frames": 9},
             "recipe": {"pretrain": {"stages": [{"name": "t2i", "media": "image", "frames": 9},
                                                {"name": "joint", "media": "joint", "frames": 5}]}}}
    assert clip_frames(joint) == 5
    images_only = {"data": {"media": ["image"], "frames": 9},
                   "recipe": {"pretrain": {"stages": [{"name": "t2i", "media": "image", "frames": 9}]}}}
    assert clip_frames(images_only) is None
    assert clip_frames({}) is None


def test_comparisons_and_report_show_the_three_models(tmp_path) -> None:
    """Every check and headline difference is a float metric; the report lists the floor first and the checks."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, size=12)
    per_prompt = {UNTRAINED: {"alignment": base, "aesthetic": base + 0.1},
                  "pretrained": {"alignment": base + 0.05, "aesthetic": base + 0.1},
                  "tuned": {"alignment": base + 0.06, "aesthetic": base + 0.2}}
    results = {name: {"alignment": float(v["alignment"].mean()), "aesthetic": float(v["aesthetic"].mean()),
                      "fid": 10.0, "latency_ms": 5.0} for name, v in per_prompt.items()}
    compared = comparisons(results, per_prompt)
    for winner, loser, metric in CHECKS:
        key = f"check.{winner}_beats_{loser}_{metric}"
        assert compared[key] == 1.0 and compared[f"{key}.significant"] == 1.0
        assert {f"{key}.ci_overlap", f"{key}.difference_ci_low", f"{key}.difference_ci_high"} <= set(compared)
    assert compared["tuned_minus_pretrained.aesthetic"] == pytest.approx(0.1)
    assert compared["tuned_minus_pretrained.fid"] == 0.0
    assert all(isinstance(v, float) for v in compared.values())

    grids = {name: np.zeros((1, 8, 8, 3), dtype=np.uint8) for name in results}
    context = {"prompts": 12, "prompt_set": "demo", "alignment_chance_floor": 0.2, "alignment_ceiling_real_images": 0.4}
    page = write_report(tmp_path, results, context, ["a frog"], grids, compared).read_text()
    assert page.index(f"<th>{UNTRAINED}</th>") < page.index("<th>pretrained</th>") < page.index("<th>tuned</th>")
    assert "aesthetic (higher is better)" in page and "tuned beats pretrained aesthetic" in page


# --- prompt sets ----------------------------------------------------------------------------------

def test_vbench_prompts_come_from_the_installed_package_with_their_dimensions() -> None:
    """All 946 prompts; category = first dimension, every dimension kept; a cap spreads over all 11 families."""
    every = load_vbench()
    assert len(every) == 946
    families = {p.category for p in every}
    assert len(families) == 11 and {"color", "scene", "human_action", "spatial_relationship"} <= families
    assert all(p.category == p.dimensions[0] for p in every)
    assert max(len(p.dimensions) for p in every) == 3  # multi-dimension prompts keep all of them
    capped = load_prompts("vbench", 32)
    assert len(capped) == 32 and {p.category for p in capped} == families
    counts = [sum(p.category == f for p in capped) for f in families]
    assert max(counts) - min(counts) <= 1
    assert load_prompts("vbench", 32) == capped  # the same prompts every run


def test_vbench_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt_sets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps vbench==0\.1\.5"):
        load_prompts("vbench", 8)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompts("no-such-set")


# --- A/B and gate inputs --------------------------------------------------------------------------

def test_ab_pairs_and_gate_inputs_follow_the_models_present() -> None:
    """With a champion: three pairs and the gate's win rate; without one: no student_vs_champion and nulls."""
    rng = np.random.default_rng(1)
    scores = {name: {"alignment": rng.uniform(0, 1, 10), "aesthetic": rng.uniform(0, 1, 10)}
              for name in ("pretrained", "tuned", "student", "champion")}
    scores["student"] = {k: v + 2.0 for k, v in scores["champion"].items()}  # beats the champion on every prompt
    results = {name: {"alignment": 0.3, "aesthetic": 0.5, "fid": 12.0, "latency_ms": 4.0} for name in scores}
    ab = ab_results(scores)
    assert list(ab) == ["student_vs_champion", "student_vs_tuned", "tuned_vs_pretrained"]
    assert ab["student_vs_champion"]["win_rate"] == 1.0 and ab["student_vs_champion"]["n"] == 10
    gate = gate_inputs(results, ab)
    assert gate == {"candidate": "student", "alignment": 0.3, "aesthetic": 0.5, "fid": 12.0, "latency_ms": 4.0,
                    "win_rate_vs_champion": 1.0, "win_rate_ci_low": ab["student_vs_champion"]["ci_low"]}

    del scores["champion"], results["champion"]
    ab = ab_results(scores)
    assert "student_vs_champion" not in ab and "student_vs_tuned" in ab
    gate = gate_inputs(results, ab)
    assert gate["win_rate_vs_champion"] is None and gate["win_rate_ci_low"] is None


# --- the champion in a real registry --------------------------------------------------------------

def _register_champion(model_dir: Path, name: str = "reelforge", alias: str = "champion") -> str:
    """Register `model_dir` the way the register stage's pyfunc stores it (artifact 'model_dir')."""
    client = tracking.client()
    run = client.create_run(tracking.ensure_experiment("evaluate-test"))
    client.log_artifacts(run.info.run_id, str(model_dir), "model/artifacts/model_dir")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def test_champion_is_downloaded_from_the_registry_alias(mlflow_uri: str, tmp_path: Path) -> None:
    """No model yet -> none, with the reason; after registration the alias resolves to the same model files."""
    directory, info = find_champion("reelforge", "champion", tmp_path / "download")
    assert directory is None and info["status"] == "none" and "champion" in info["reason"]
    model = write_model_dir(tmp_path / "student", guidance_embed=True, seed=3)
    version = _register_champion(model)
    directory, info = find_champion("reelforge", "champion", tmp_path / "download")
    assert info == {"status": "evaluated", "source": "models:/reelforge@champion", "version": version,
                    "run_id": info["run_id"]}
    assert (directory / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert json.loads((directory / "config.json").read_text())["distill"]["student_steps"] == 2


# --- the model card -------------------------------------------------------------------------------

def test_model_card_shows_metrics_with_intervals_ab_lineage_and_samples(tmp_path: Path) -> None:
    models = {"tuned": {"alignment": 0.31, "alignment_ci_low": 0.29, "alignment_ci_high": 0.33, "fid": 40.0,
                        "steps": 20.0, "latency_ms": 50.0},
              "student": {"alignment": 0.30, "alignment_ci_low": 0.28, "alignment_ci_high": 0.32, "fid": 42.0,
                          "steps": 4.0, "latency_ms": 9.0}}
    summary = {
        "models": models,
        "ab": {"student_vs_tuned": {"win_rate": 0.45, "ci_low": 0.36, "ci_high": 0.55, "n": 100, "wins": 40,
                                    "ties": 10, "losses": 50}},
        "gate_inputs": {"candidate": "student"},
        "champion": {"status": "none", "reason": "no version of 'reelforge' has alias 'champion'"},
        "judge": "the judge",
        "context": {"prompt_set": "demo", "prompts": 100},
        "prompt_sets": {"vbench": {"prompts": 4, "models": {"student": {
            "aesthetic": 0.5, "diversity": 0.2, "categories": {"color": {"n": 2, "aesthetic": 0.6, "diversity": 0.1}}}}}},
        "lineage": {"dataset_sha256": "d" * 64, "git_commit": "abc123", "pipeline_run": "job-1",
                    "models": {"tuned": {"dir": "/m/tuned", "stage": "quality_tune", "step": 100},
                               "student": {"dir": "/m/student", "stage": "distill", "step": 300, "distill": {
                                   "teacher_steps": 32, "student_steps": 4,
                                   "teachers": [{"source": "tuned", "weight": 1.0},
                                                {"source": "models:/reelforge-teacher/3", "weight": 0.5}]}}}},
    }
    grids = {"tuned": np.zeros((2, 8, 8, 3), np.uint8), "student": np.full((2, 8, 8, 3), 255, np.uint8)}
    markdown, page = write_model_card(tmp_path, summary, ["a <b>frog</b>", "a cat"], grids)
    assert (markdown.name, page.name) == ("model_card.md", "model_card.html")
    text = markdown.read_text()
    assert "# Model card: student" in text and "no champion to compare with" in text
    assert "| alignment (higher is better) | 0.31 [0.29, 0.33] | 0.3 [0.28, 0.32] |" in text
    assert "| student vs tuned | 0.45 | 0.36 .. 0.55 | 40 / 10 / 50 | 100 |" in text
    assert "| color | 0.6 / 0.1 (n=2) |" in text
    assert "d" * 64 in text and "abc123" in text and "| student | distill | 300 |" in text
    assert "tuned (weight 1), models:/reelforge-teacher/3 (weight 0.5); 32 teacher steps -> 4 student steps" in text
    assert "![student samples](grids/student.png)" in text and "not Inception-FID" in text
    html_text = page.read_text()
    assert html_text.count("data:image/png;base64,") == 4  # 2 prompts x 2 models, embedded
    assert "a &lt;b&gt;frog&lt;/b&gt;" in html_text and "<b>frog</b>" not in html_text
    assert "<td>0.31 [0.29, 0.33]</td>" in html_text


# --- the whole stage ------------------------------------------------------------------------------

@pytest.mark.slow
def test_stage_scores_student_and_registry_champion_and_logs_ab_and_card(mlflow_uri: str, tmp_path: Path,
                                                                          single_thread) -> None:
    """Through the runner with real MLflow: every model at its own steps, VBench per category, A/B win rates
    as metrics.json entries and MLflow metrics, gate inputs, the card and grids as run artifacts."""
    dataset = curated_discs(tmp_path / "data")
    recipe = load_recipe("tiny", {"text.max_tokens": 8, "evaluate.max_prompts": 6, "evaluate.max_extra_prompts": 4,
                                  "evaluate.grid_prompts": 3, "evaluate.feature_resolution": 32,
                                  "evaluate.latency_repeats": 1})
    inputs = {"dataset": dataset, "pretrained": write_model_dir(tmp_path / "pretrained", seed=1),
              "tuned": write_model_dir(tmp_path / "tuned", seed=2),
              "student": write_model_dir(tmp_path / "student", guidance_embed=True, seed=3)}
    champion_version = _register_champion(write_model_dir(tmp_path / "champion", guidance_embed=True, seed=4))
    out = tmp_path / "evaluation"
    result = execute("evaluate", recipe, inputs, {"evaluation": out}, RunContext(git_commit="abc123"))

    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["models"]) == [UNTRAINED, "pretrained", "tuned", "student", "champion"]
    assert summary["models"]["tuned"]["steps"] == recipe.evaluate.sampling.steps == 4
    assert summary["models"]["student"]["steps"] == summary["models"]["champion"]["steps"] == 2  # their config.json
    for values in summary["models"].values():
        assert values["fid"] >= 0 and values["latency_ms"] > 0 and values["throughput_images_per_s"] > 0
    assert summary["champion"]["status"] == "evaluated" and summary["champion"]["version"] == champion_version
    assert set(summary["ab"]) == {"student_vs_champion", "student_vs_tuned", "tuned_vs_pretrained"}
    for pair in summary["ab"].values():
        assert pair["n"] == 6 and pair["ci_low"] <= pair["win_rate"] <= pair["ci_high"]
        assert pair["wins"] + pair["ties"] + pair["losses"] == 6
    gate = summary["gate_inputs"]
    assert gate["candidate"] == "student" and gate["fid"] == summary["models"]["student"]["fid"]
    assert gate["win_rate_vs_champion"] == summary["ab"]["student_vs_champion"]["win_rate"]
    vbench = summary["prompt_sets"]["vbench"]
    assert vbench["prompts"] == 4 and len(vbench["models"]["student"]["categories"]) == 4
    assert summary["lineage"]["git_commit"] == "abc123"
    assert summary["lineage"]["models"]["student"]["distill"]["teachers"] == [{"source": "tuned", "weight": 1.0}]

    run = tracking.client().get_run(result.metadata["mlflow_run_id"])
    assert run.data.metrics["ab.student_vs_champion.win_rate"] == summary["ab"]["student_vs_champion"]["win_rate"]
    assert run.data.metrics["student.steps"] == 2 and "champion.fid" in run.data.metrics
    logged = {a.path for a in tracking.client().list_artifacts(run.info.run_id)}
    assert {"model_card.md", "model_card.html", "metrics.json", "report.html", "grids"} <= logged
    assert {a.path for a in tracking.client().list_artifacts(run.info.run_id, "grids")} >= {"grids/student.png",
                                                                                            "grids/champion.png"}
    card = (out / "model_card.md").read_text()
    assert f"models:/reelforge@champion (version {champion_version})" in card and "student vs champion" in card
