"""Behaviour of the latent codecs the generator sees: pixel identity, normalised autoencoder latents,
statistics and rebuilding a codec from its description."""

import json

import pytest
import torch

from models.autoencoder import PRESETS
from models.latent import AutoencoderCodec, PixelCodec, codec_from_dict, latent_stats
from tests.unit.test_models_autoencoder import _perturbed, _pixels

pytestmark = pytest.mark.usefixtures("single_thread")


def _autoencoder(seed: int = 0):
    """The tiny preset with weights moved off their identity/zero init, so encoding is non-trivial."""
    return _perturbed(PRESETS["tiny"], seed)


def test_pixel_codec_is_the_identity():
    codec = PixelCodec()
    assert (codec.channels, codec.spatial_downsample, codec.temporal_downsample) == (3, 1, 1)
    assert codec.latent_shape(5, 32, 24) == (3, 5, 32, 24)
    for x in (_pixels(2, 3), _pixels(2, 1)[:, :, 0]):
        latents = codec.encode(x)
        assert torch.equal(latents, x)
        assert torch.equal(codec.decode(latents), x)
    assert torch.equal(codec.decode(torch.full((1, 3, 1, 2, 2), 3.0)), torch.ones(1, 3, 1, 2, 2))  # clamped
    assert codec.weights() == {}
    assert isinstance(codec_from_dict(json.loads(json.dumps(codec.to_dict()))), PixelCodec)


def test_latent_stats_normalise_to_zero_mean_unit_std():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(64, 4, 2, 4, 4, generator=g) * torch.tensor([0.5, 2.0, 10.0, 0.1]).view(1, 4, 1, 1, 1)
    raw = raw + torch.tensor([3.0, -1.0, 0.0, 7.0]).view(1, 4, 1, 1, 1)
    shift, scale = latent_stats(raw)
    assert shift.shape == scale.shape == (4,)
    normalised = (raw - shift.view(1, 4, 1, 1, 1)) / scale.view(1, 4, 1, 1, 1)
    per_channel = normalised.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(4), atol=1e-5, rtol=0)
    # 4D latents (images) work too, and a dead channel gets a positive scale.
    _, scale4 = latent_stats(torch.zeros(8, 4, 3, 3))
    assert (scale4 > 0).all()
    with pytest.raises(ValueError, match="latents"):
        latent_stats(torch.zeros(4, 4))


def test_autoencoder_codec_latents_are_normalised_posterior_means():
    model = _autoencoder()
    x = _pixels(6, 5)
    with torch.no_grad():
        raw, _ = model.encode(x)
    shift, scale = latent_stats(raw)
    codec = AutoencoderCodec(model, shift, scale, batch_size=4)  # batched internally: 4 + 2
    assert (codec.channels, codec.spatial_downsample, codec.temporal_downsample) == (4, 2, 2)
    assert codec.latent_shape(5, 16, 16) == (4, 3, 8, 8)
    latents = codec.encode(x)
    assert latents.shape == (6, 4, 3, 8, 8)
    assert not latents.requires_grad
    torch.testing.assert_close(latents, (raw - shift.view(1, -1, 1, 1, 1)) / scale.view(1, -1, 1, 1, 1))
    per_channel = latents.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)


def test_autoencoder_codec_decode_inverts_the_normalisation_and_clamps():
    model = _autoencoder()
    x = _pixels(3, 3)
    codec = AutoencoderCodec(model, torch.tensor([0.5, -0.5, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0]))
    latents = codec.encode(x)
    pixels = codec.decode(latents)
    with torch.no_grad():
        expected = model.decode(model.encode(x)[0]).clamp(-1, 1)
    assert pixels.shape == x.shape
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=1e-5)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_autoencoder_codec_accepts_images_as_4d():
    model = _autoencoder()
    codec = AutoencoderCodec(model, torch.zeros(4), torch.ones(4))
    image = _pixels(2, 1)[:, :, 0]  # [B, 3, H, W]
    latents = codec.encode(image)
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, codec.encode(image[:, :, None])[:, :, 0])
    assert codec.decode(latents).shape == image.shape


def test_codec_round_trips_through_its_description():
    codec = AutoencoderCodec(_autoencoder(), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    description = json.loads(json.dumps(codec.to_dict()))  # plain JSON
    rebuilt = codec_from_dict(description, codec.weights())
    x = _pixels(2, 3)
    assert torch.equal(rebuilt.encode(x), codec.encode(x))
    assert torch.equal(rebuilt.decode(codec.encode(x)), codec.decode(codec.encode(x)))
    with pytest.raises(ValueError, match="weights"):
        codec_from_dict(description, None)
    with pytest.raises(ValueError, match="kind"):
        codec_from_dict({"kind": "vqgan"})
    with pytest.raises(ValueError, match="extra"):
        codec_from_dict({**description, "extra": 1}, codec.weights())


def test_codec_rejects_bad_statistics_and_shapes():
    model = _autoencoder()
    with pytest.raises(ValueError, match="4 values"):
        AutoencoderCodec(model, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        AutoencoderCodec(model, torch.zeros(4), torch.zeros(4))
    codec = AutoencoderCodec(model, torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="temporal_downsample"):
        codec.encode(_pixels(1, 4))
    with pytest.raises(ValueError, match="pixels"):
        codec.encode(torch.zeros(3, 16, 16))
