"""The space the generator works in: raw pixels, or normalised autoencoder latents.

A codec turns pixels [B,3,T,H,W] in [-1,1] into what the DiT is trained on and back:

- :class:`PixelCodec`: the identity (3 channels, no compression); the pixel-space baseline.
- :class:`AutoencoderCodec`: the posterior mean of a causal VAE, normalised per channel,
  latents = (mean - shift) / scale, so the generator sees roughly zero-mean unit-variance
  channels whatever the autoencoder learnt (the role of Stable Diffusion's 0.18215 factor;
  per channel because VAE channels differ in scale). Decoding inverts it and clamps to [-1,1].

Both also take 4D tensors [B,C,H,W] as one-frame videos and give 4D back. A codec is described
by :meth:`to_dict` (plain JSON) plus, for the autoencoder, its weights (:meth:`weights`, saved
as safetensors); :func:`codec_from_dict` rebuilds it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from models.autoencoder.model import Autoencoder, AutoencoderConfig, build


class LatentCodec(Protocol):
    """What the generator needs to know about its data space."""

    channels: int
    spatial_downsample: int
    temporal_downsample: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a clip."""
        ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,T,H,W] (or [B,3,H,W]) in [-1,1] -> latents of the same rank."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1,1] of the same rank."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON description for :func:`codec_from_dict`."""
        ...

    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors :func:`codec_from_dict` needs besides the dict (empty for pixels)."""
        ...


def _as_video(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """[B,C,H,W] -> ([B,C,1,H,W], True); [B,C,T,H,W] -> (x, False); anything else raises."""
    if x.ndim == 4:
        return x.unsqueeze(2), True
    if x.ndim == 5:
        return x, False
    raise ValueError(f"{what} must be [B,C,T,H,W] or [B,C,H,W], got {list(x.shape)}")


class PixelCodec(nn.Module):
    """Identity codec: the generator works on pixels."""

    channels = 3
    spatial_downsample = 1
    temporal_downsample = 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(3, frames, height, width)."""
        return self.channels, frames, height, width

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> a float copy of them."""
        _as_video(pixels, "pixels")
        return pixels.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the same values clamped to [-1, 1]."""
        _as_video(latents, "latents")
        return latents.float().clamp(-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """{"kind": "pixel"}."""
        return {"kind": "pixel"}

    def weights(self) -> dict[str, torch.Tensor]:
        """No tensors."""
        return {}


class AutoencoderCodec(nn.Module):
    """Normalised posterior means of a causal VAE: latents = (mean - shift) / scale, per channel.

    ``batch_size`` bounds how many samples go through the autoencoder at once (memory). Encoding
    and decoding run without gradients on the autoencoder's device and in its current mode
    (the network has no dropout or batch norm, so the mode does not change results).
    """

    def __init__(self, autoencoder: Autoencoder, shift: torch.Tensor, scale: torch.Tensor, batch_size: int = 16) -> None:
        super().__init__()
        channels = autoencoder.config.latent_channels
        shift = torch.as_tensor(shift, dtype=torch.float32).flatten()
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        if shift.shape != (channels,) or scale.shape != (channels,):
            raise ValueError(f"shift and scale need {channels} values (one per latent channel), "
                             f"got {list(shift.shape)} and {list(scale.shape)}")
        if not (torch.isfinite(shift).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("shift must be finite and scale finite and > 0")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.autoencoder = autoencoder
        self.batch_size = batch_size
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    @property
    def channels(self) -> int:
        """Latent channels."""
        return self.autoencoder.config.latent_channels

    @property
    def spatial_downsample(self) -> int:
        """Height/width compression."""
        return self.autoencoder.config.spatial_downsample

    @property
    def temporal_downsample(self) -> int:
        """Time compression k: T' = 1 + (T-1)/k."""
        return self.autoencoder.config.temporal_downsample

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a clip; ValueError for shapes it cannot encode."""
        return self.autoencoder.latent_shape(frames, height, width)

    def _device(self) -> torch.device:
        """Where the autoencoder's weights are (the work happens there)."""
        return next(self.autoencoder.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,T,H,W] (or [B,3,H,W]) in [-1,1] -> normalised latents [B,Cl,T',h,w] (or [B,Cl,h,w])."""
        video, squeeze = _as_video(pixels, "pixels")
        chunks = []
        for part in video.split(self.batch_size):
            mean, _ = self.autoencoder.encode(part.to(self._device(), torch.float32))
            chunks.append(mean.float())
        shift, scale = self.shift.to(self._device()), self.scale.to(self._device())
        latents = (torch.cat(chunks) - shift.view(1, -1, 1, 1, 1)) / scale.view(1, -1, 1, 1, 1)
        return latents.squeeze(2) if squeeze else latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,Cl,T',h,w] (or [B,Cl,h,w]) -> pixels [B,3,T,H,W] (or [B,3,H,W]) in [-1,1]."""
        video, squeeze = _as_video(latents, "latents")
        shift, scale = self.shift.to(self._device()), self.scale.to(self._device())
        z = video.to(self._device(), torch.float32) * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)
        pixels = torch.cat([self.autoencoder.decode(part).float() for part in z.split(self.batch_size)])
        pixels = pixels.clamp(-1.0, 1.0)
        return pixels.squeeze(2) if squeeze else pixels

    def to_dict(self) -> dict[str, Any]:
        """{"kind": "autoencoder", "config": ..., "shift": [...], "scale": [...]} (weights separate)."""
        return {
            "kind": "autoencoder",
            "config": self.autoencoder.config.to_dict(),
            "shift": [float(v) for v in self.shift.cpu()],
            "scale": [float(v) for v in self.scale.cpu()],
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """The autoencoder's state dict (for safetensors)."""
        return dict(self.autoencoder.state_dict())


def latent_stats(latents: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (shift, scale) = (mean, std) of raw latents [N,C,T,H,W] or [N,C,H,W], for :class:`AutoencoderCodec`.

    Computed over every sample, frame and position of the sample given (in float64); scale is at
    least `eps`, so a dead channel does not divide by zero.
    """
    if latents.ndim not in (4, 5):
        raise ValueError(f"latents must be [N,C,T,H,W] or [N,C,H,W], got {list(latents.shape)}")
    values = latents.detach().double().transpose(0, 1).flatten(1)  # [C, everything else]
    if values.shape[1] < 2:
        raise ValueError("need at least two latent values per channel to estimate a scale")
    shift = values.mean(dim=1)
    scale = values.std(dim=1, correction=0).clamp_min(eps)
    return shift.float(), scale.float()


def codec_from_dict(data: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> PixelCodec | AutoencoderCodec:
    """Rebuild a codec from :meth:`to_dict` output and, for an autoencoder, its :meth:`weights` (required)."""
    kind = data.get("kind")
    if kind == "pixel":
        unknown = sorted(set(data) - {"kind"})
        if unknown:
            raise ValueError(f"unknown pixel codec fields: {', '.join(unknown)}")
        return PixelCodec()
    if kind == "autoencoder":
        unknown = sorted(set(data) - {"kind", "config", "shift", "scale"})
        if unknown:
            raise ValueError(f"unknown autoencoder codec fields: {', '.join(unknown)}")
        missing = sorted({"config", "shift", "scale"} - set(data))
        if missing:
            raise ValueError(f"autoencoder codec needs fields: {', '.join(missing)}")
        if weights is None:
            raise ValueError("an autoencoder codec needs its weights (codec.weights()); got None")
        autoencoder = build(AutoencoderConfig.from_dict(data["config"]))
        autoencoder.load_state_dict(weights, strict=True)
        return AutoencoderCodec(autoencoder.eval(), torch.tensor(data["shift"]), torch.tensor(data["scale"]))
    raise ValueError(f"codec kind must be 'pixel' or 'autoencoder', got {kind!r}")
