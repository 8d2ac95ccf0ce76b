"""Behaviour of the causal video autoencoder: shapes, causality, image = first video frame, errors,
config validation, presets, metrics and a few training steps."""

import math

import lightning
import pytest
import torch

from models.autoencoder import PRESETS, Autoencoder, AutoencoderConfig, build, parameter_count
from models.autoencoder.metrics import psnr, ssim
from models.autoencoder.training import AutoencoderModule, AutoencoderTrainConfig, kl_divergence

TINY = PRESETS["tiny"]

pytestmark = pytest.mark.usefixtures("single_thread")


def _config(temporal: int) -> AutoencoderConfig:
    """Tiny model with 4x space and the given time compression."""
    return AutoencoderConfig(latent_channels=4, base_channels=8, channel_mults=(1, 1, 1), layers_per_block=1,
                             temporal_downsample=temporal, norm_groups=4)


def _perturbed(config: AutoencoderConfig, seed: int = 0) -> Autoencoder:
    """A model whose identity/zero-initialised layers have moved, as after training (so every path matters)."""
    torch.manual_seed(seed)
    model = build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _pixels(batch: int, frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("temporal", [1, 2, 4])
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes_for_images_and_videos(temporal, frames):
    model = _perturbed(_config(temporal))
    x = _pixels(2, frames)
    recon, mean, logvar = model(x, sample_posterior=False)
    expected_latent_frames = 1 + (frames - 1) // temporal
    assert mean.shape == logvar.shape == (2, 4, expected_latent_frames, 4, 4)
    assert model.latent_shape(frames, 16, 16) == (4, expected_latent_frames, 4, 4)
    assert recon.shape == x.shape
    assert model.decode(mean).shape == x.shape
    assert torch.isfinite(recon).all()


@pytest.mark.parametrize("temporal", [2, 4])
def test_first_latent_frame_ignores_later_frames(temporal):
    """Causality: changing frames 1.. leaves latent frame 0 (and decoded frame 0) exactly as it was."""
    model = _perturbed(_config(temporal))
    x = _pixels(2, 9)
    changed = x.clone()
    changed[:, :, 1:] = _pixels(2, 8, seed=7)
    mean, _ = model.encode(x)
    mean_changed, _ = model.encode(changed)
    assert torch.equal(mean[:, :, 0], mean_changed[:, :, 0])
    assert not torch.allclose(mean[:, :, 1:], mean_changed[:, :, 1:])  # later latents do see them
    # Decoding is causal too: pixel frame 0 depends on latent frame 0 only.
    z2 = mean.clone()
    z2[:, :, 1:] += 1.0
    assert torch.equal(model.decode(mean)[:, :, 0], model.decode(z2)[:, :, 0])


@pytest.mark.parametrize("temporal", [1, 2, 4])
def test_image_takes_the_path_of_a_videos_first_frame(temporal):
    model = _perturbed(_config(temporal))
    video = _pixels(3, 1 + 2 * temporal)
    image = video[:, :, :1]
    video_mean, video_logvar = model.encode(video)
    image_mean, image_logvar = model.encode(image)
    assert image_mean.shape[2] == 1
    torch.testing.assert_close(image_mean[:, :, 0], video_mean[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_logvar[:, :, 0], video_logvar[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(image_mean)[:, :, 0], model.decode(video_mean)[:, :, 0],
                               atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    model = build(_config(4))
    with pytest.raises(ValueError, match="divisible by temporal_downsample 4"):
        model.encode(_pixels(1, 4))
    with pytest.raises(ValueError, match="spatial downsample 4"):
        model.encode(torch.zeros(1, 3, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="temporal_downsample"):
        model.latent_shape(6, 16, 16)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"latent_channels": 0}, "latent_channels"),
        ({"base_channels": True}, "base_channels"),
        ({"channel_mults": ()}, "channel_mults"),
        ({"channel_mults": (1, -2)}, "channel_mults"),
        ({"temporal_downsample": 3}, "temporal_downsample"),
        ({"temporal_downsample": 8, "channel_mults": (1, 2)}, "temporal_downsample"),
        ({"norm_groups": 3}, "norm_groups"),
        ({"attention": "yes"}, "attention"),
        ({"layers_per_block": 1.5}, "layers_per_block"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        AutoencoderConfig(**{**TINY.to_dict(), **changes})


def test_config_dict_round_trip_and_unknown_keys():
    for config in PRESETS.values():
        assert AutoencoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderConfig.from_dict({**TINY.to_dict(), "double_z": True})


def test_presets_compress_as_documented():
    demo, tae = PRESETS["demo"], PRESETS["moviegen-tae"]
    assert (demo.spatial_downsample, demo.temporal_downsample, demo.latent_channels) == (4, 4, 8)
    assert (tae.spatial_downsample, tae.temporal_downsample, tae.latent_channels) == (8, 8, 16)
    # Movie Gen: a 768px frame becomes 96x96; 1 + 8n frames become 1 + n latent frames.
    assert tae.latent_shape(121, 768, 768) == (16, 16, 96, 96)


def test_moviegen_tae_builds_on_meta_device():
    model = build(PRESETS["moviegen-tae"], device="meta")
    assert all(p.is_meta for p in model.parameters())
    count = parameter_count(model)
    assert 80e6 < count < 120e6, count  # an SD-VAE-sized backbone plus temporal convolutions
    z = torch.empty(1, 16, 2, 4, 4, device="meta")
    assert model.decode(z).shape == (1, 3, 9, 32, 32)


def test_untrained_model_treats_frames_independently():
    """Temporal convolutions start as the identity (Movie Gen's inflation init)."""
    model = build(_config(1))
    video = _pixels(1, 3)
    frames = torch.cat([model.encode(video[:, :, t : t + 1])[0] for t in range(3)], dim=2)
    torch.testing.assert_close(model.encode(video)[0], frames, atol=1e-5, rtol=1e-5)


def test_posterior_sampling_follows_the_generator():
    model = _perturbed(TINY)
    x = _pixels(2, 3)
    a = model(x, generator=torch.Generator().manual_seed(3))[0]
    b = model(x, generator=torch.Generator().manual_seed(3))[0]
    c = model(x, generator=torch.Generator().manual_seed(4))[0]
    mean_only = model(x, sample_posterior=False)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, mean_only)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_psnr_known_values():
    x = _pixels(2, 1)
    assert math.isinf(psnr(x, x).item())
    # A constant error of 0.02 on a range of 2: MSE 4e-4 -> 10*log10(4/4e-4) = 40 dB.
    torch.testing.assert_close(psnr(x + 0.02, x), torch.tensor(40.0))
    g = torch.Generator().manual_seed(0)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)  # MSE ~ 0.01 -> ~26 dB
    per_sample = psnr(noisy, x, reduction="none")
    assert per_sample.shape == (2,)
    assert torch.allclose(per_sample, torch.full((2,), 26.02), atol=0.3)
    # Shapes other than [B,C,T,H,W] work too, and the scale is per sample.
    assert psnr(x[:, :, 0] + 0.02, x[:, :, 0]).item() == pytest.approx(40.0, abs=1e-4)
    worse = torch.stack([x[0] + 0.02, x[1] + 0.2])
    assert psnr(worse, x, reduction="none").tolist() == pytest.approx([40.0, 20.0], abs=1e-4)


def test_ssim_known_values():
    x = _pixels(2, 3, size=24)
    torch.testing.assert_close(ssim(x, x), torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a = ssim(noisy, x, reduction="none")
    assert a.shape == (2,) and (a < 0.95).all() and (a > 0).all()
    # A video is the mean over its frames.
    frames = torch.stack([ssim(noisy[:, :, t], x[:, :, t], reduction="none") for t in range(3)], dim=1)
    torch.testing.assert_close(a, frames.mean(dim=1))
    # An unrelated image is far less similar than a slightly noisy one.
    assert ssim(_pixels(2, 1, size=24, seed=9), x[:, :, :1]) < 0.2
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :1])


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = _pixels(1, 1, size=32)[:, :, 0]
    g = torch.Generator().manual_seed(2)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    expected = metrics.structural_similarity(
        ((y[0] + 1) / 2).numpy(), ((x[0] + 1) / 2).numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0)
    assert ssim(y, x).item() == pytest.approx(float(expected), abs=1e-5)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def _structured(n: int, frames: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Blocky coloured images/clips that drift sideways over time: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 4, 4, generator=g) * 2 - 1
    base = colours.repeat_interleave(size // 4, dim=3).repeat_interleave(size // 4, dim=4)  # [n,3,1,H,W]
    return torch.cat([base.roll(t, dims=4) for t in range(frames)], dim=2)


def _trainer(steps: int) -> lightning.Trainer:
    return lightning.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def test_a_few_training_steps_reduce_loss_and_raise_psnr():
    images = _structured(8, 1)
    videos = _structured(4, 3, seed=1)
    batch = {"groups": [{"pixels": images}, {"pixels": videos}]}
    torch.manual_seed(0)
    module = AutoencoderModule(TINY, AutoencoderTrainConfig(lr=3e-3, warmup_steps=1))

    def evaluate():
        with torch.no_grad():
            return [psnr(module.model(x, sample_posterior=False)[0].clamp(-1, 1), x).item() for x in (images, videos)]

    before = evaluate()
    losses = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = _trainer(40)
    trainer.callbacks.append(Record())
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    after = evaluate()
    assert sum(losses[-5:]) / 5 < 0.65 * sum(losses[:5]) / 5, losses
    assert after[0] > before[0] + 3 and after[1] > before[1] + 3, (before, after)

    metrics = trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)[0]
    for key in ("val/l1", "val/psnr", "val/ssim", "val/psnr_image", "val/psnr_video", "val/ssim_image"):
        assert key in metrics
    # The overall value is the sample-weighted mean of the per-kind values.
    assert metrics["val/psnr"] == pytest.approx((8 * metrics["val/psnr_image"] + 4 * metrics["val/psnr_video"]) / 12,
                                                rel=1e-4)


def test_group_loss_is_the_sample_weighted_mean():
    torch.manual_seed(0)
    module = AutoencoderModule(TINY, AutoencoderTrainConfig(sample_posterior=False, kl_weight=0.1, mse_weight=0.5))
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    images, videos = _structured(6, 1), _structured(2, 3, seed=1)
    joint = module.training_step({"groups": [{"pixels": images}, {"pixels": videos}]}, 0)
    alone = [module.training_step({"pixels": x}, 0) for x in (images, videos)]
    torch.testing.assert_close(joint, (6 * alone[0] + 2 * alone[1]) / 8)


def test_training_is_deterministic_given_seeds():
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = AutoencoderModule(TINY, AutoencoderTrainConfig(lr=1e-3, warmup_steps=2))
        loader = torch.utils.data.DataLoader([{"pixels": _structured(4, 3)}], batch_size=None)
        _trainer(3).fit(module, loader)
        return module.model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_config_validation_names_the_field():
    for changes, field in [({"lr": 0}, "lr"), ({"kl_weight": -1}, "kl_weight"), ({"betas": (0.9, 1.0)}, "betas"),
                           ({"warmup_steps": -1}, "warmup_steps"), ({"sample_posterior": 1}, "sample_posterior")]:
        with pytest.raises(ValueError, match=field):
            AutoencoderTrainConfig(**changes)


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 1, 2, 2)
    torch.testing.assert_close(kl_divergence(zeros, zeros), torch.zeros(2))
    assert (kl_divergence(zeros + 1, zeros) > 0).all()


def test_batches_without_pixels_are_refused():
    module = AutoencoderModule(TINY)
    with pytest.raises(ValueError, match="pixels"):
        module.training_step({"image": torch.zeros(1, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match=r"\[B,3,T,H,W\]"):
        module.training_step({"pixels": torch.zeros(1, 3, 16, 16)}, 0)
