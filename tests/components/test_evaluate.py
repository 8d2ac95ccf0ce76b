"""Evaluation stage pieces that the end-to-end run depends on: the untrained floor, clip detection, checks, report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.evaluate.stage import CHECKS, UNTRAINED, clip_frames, comparisons, untrained_like, write_report
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
                      "fd": 10.0, "latency_ms": 5.0} for name, v in per_prompt.items()}
    compared = comparisons(results, per_prompt)
    for winner, loser, metric in CHECKS:
        key = f"check.{winner}_beats_{loser}_{metric}"
        assert compared[key] == 1.0 and compared[f"{key}.significant"] == 1.0
        assert {f"{key}.ci_overlap", f"{key}.difference_ci_low", f"{key}.difference_ci_high"} <= set(compared)
    assert compared["tuned_minus_pretrained.aesthetic"] == pytest.approx(0.1)
    assert compared["tuned_minus_pretrained.fd"] == 0.0
    assert all(isinstance(v, float) for v in compared.values())

    grids = {name: np.zeros((1, 8, 8, 3), dtype=np.uint8) for name in results}
    context = {"prompts": 12, "prompt_set": "demo", "alignment_chance_floor": 0.2, "alignment_ceiling_real_images": 0.4}
    page = write_report(tmp_path, results, context, ["a frog"], grids, compared).read_text()
    assert page.index(f"<th>{UNTRAINED}</th>") < page.index("<th>pretrained</th>") < page.index("<th>tuned</th>")
    assert "aesthetic (higher is better)" in page and "tuned beats pretrained aesthetic" in page
