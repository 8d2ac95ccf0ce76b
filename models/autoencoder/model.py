"""Causal convolutional VAE for images and videos: Movie Gen's temporal autoencoder (TAE), small.

Movie Gen builds its TAE by "inflating" an image autoencoder: a 1D temporal convolution after
every 2D spatial convolution, with strided temporal convolutions compressing time as the spatial
ones compress height and width. This file follows that recipe with one change the lead's design
asks for: every temporal convolution is *causal* (output frame t sees input frames <= t, the start
padded by repeating the first frame), so

- a video of T frames has T' = 1 + (T-1)/k latent frames (k = temporal_downsample), so an image is
  simply a 1-frame video and gives a 1-frame latent for any k;
- the first latent frame of a video depends only on its first frame, and is computed by the same
  operations as the latent of that frame encoded alone as an image. One model, trained on images
  and videos together, serves both text-to-image and text-to-video.

Everything that mixes positions within a frame (GroupNorm, spatial convolutions, attention) works
frame by frame, which is what keeps the whole network causal in time. Activations travel as
[B, T, C, H, W] inside the network so that "frame by frame" is a free reshape to [B*T, C, H, W];
the public API takes and returns [B, C, T, H, W] like the rest of reelforge.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture hyper-parameters of an :class:`Autoencoder`; validated on construction."""

    in_channels: int = 3  # channels of the pixels (RGB)
    latent_channels: int = 8  # channels of the latent the generator sees (Movie Gen TAE: 16)
    base_channels: int = 32  # width of the first (full-resolution) level
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; each level after the first halves H and W
    layers_per_block: int = 1  # residual blocks per level, in the encoder and in the decoder
    temporal_downsample: int = 4  # time compression k (1, 2, 4, 8...): T' = 1 + (T-1)/k; one halving per level, deepest first
    attention: bool = False  # per-frame self-attention in the middle block (costly at CPU sizes; on for the big preset)
    norm_groups: int = 8  # GroupNorm groups; must divide every level's width

    def __post_init__(self) -> None:
        for name in ("in_channels", "latent_channels", "base_channels", "layers_per_block",
                     "temporal_downsample", "norm_groups"):
            value = getattr(self, name)
            # bool is an int subclass; True as a width is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        mults = self.channel_mults
        if isinstance(mults, list):  # from JSON; frozen, so set through object.__setattr__
            mults = tuple(mults)
            object.__setattr__(self, "channel_mults", mults)
        if (not isinstance(mults, tuple) or not mults
                or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in mults)):
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {mults!r}")
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be a bool, got {self.attention!r}")
        k = self.temporal_downsample
        if k & (k - 1):
            raise ValueError(f"temporal_downsample must be a power of two, got {k}")
        if self.temporal_levels > len(mults) - 1:
            raise ValueError(
                f"temporal_downsample {k} needs {self.temporal_levels} downsampling levels but channel_mults "
                f"{mults} gives {len(mults) - 1}; time is halved only where space is"
            )
        for m in mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"norm_groups ({self.norm_groups}) must divide every level width "
                    f"(base_channels {self.base_channels} x channel_mults {mults})"
                )

    @property
    def spatial_downsample(self) -> int:
        """Height/width compression: 2 per level after the first."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def temporal_levels(self) -> int:
        """Number of levels that also halve time (log2 of temporal_downsample)."""
        return int(math.log2(self.temporal_downsample))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a [frames, height, width] clip; ValueError if it has none."""
        check_pixel_shape(self, frames, height, width)
        s, k = self.spatial_downsample, self.temporal_downsample
        return self.latent_channels, 1 + (frames - 1) // k, height // s, width // s

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, the inverse of :meth:`from_dict`."""
        data = dataclasses.asdict(self)
        data["channel_mults"] = list(self.channel_mults)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoencoderConfig":
        """Build from :meth:`to_dict` output; unknown keys raise so stale configs fail loudly."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields: {', '.join(unknown)}")
        return cls(**data)


def check_pixel_shape(config: AutoencoderConfig, frames: int, height: int, width: int) -> None:
    """Raise ValueError unless a [frames, height, width] clip can be encoded by this config."""
    s, k = config.spatial_downsample, config.temporal_downsample
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if (frames - 1) % k:
        raise ValueError(
            f"frames - 1 must be divisible by temporal_downsample {k} (causal compression: T' = 1 + (T-1)/{k}); "
            f"got {frames} frames, use e.g. {1 + k * max(1, (frames - 1) // k)}"
        )
    if height % s or width % s:
        raise ValueError(f"height and width must be divisible by the spatial downsample {s}, got {height}x{width}")


#################################################################################
#                          Causal space-time building blocks                    #
#################################################################################


class CausalTemporalConv(nn.Module):
    """1D convolution over time that never looks ahead: output frame t sees input frames t-k+1..t.

    The start is padded by repeating the first frame, so the first output frame is a function of
    the first input frame alone, (sum of taps) @ x_0 + b. It is computed that way, by one 1x1
    convolution, whether T is 1 or 100: an image and a video's first frame take the same path.
    With stride s, outputs are taken at input frames 0, s, 2s, ... (so T' = 1 + (T-1)/s).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # Tap 0 is the oldest frame, tap kernel-1 the current one.
        self.weight = nn.Parameter(torch.empty(out_channels, kernel, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))

    def reset_parameters(self) -> None:
        """Identity on the current frame (the inflation init of Movie Gen): an untrained temporal conv is a no-op."""
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if self.weight.shape[0] == self.weight.shape[2]:
            with torch.no_grad():
                self.weight[:, -1].copy_(torch.eye(self.weight.shape[0]))
        else:
            nn.init.xavier_uniform_(self.weight[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T',O,H,W] with T' = 1 + (T-1)/stride."""
        B, T, C, H, W = x.shape
        O, k, s = self.weight.shape[0], self.kernel, self.stride
        if (T - 1) % s:
            raise ValueError(f"temporal stride {s} needs T-1 divisible by {s}, got T={T}")
        first = F.conv2d(x[:, 0], self.weight.sum(1)[:, :, None, None], self.bias)  # [B, O, H, W]
        if T == 1:
            return first[:, None]
        # Output j >= 1 sits at input frame j*s and reads frames j*s-k+1 .. j*s; frames before 0
        # are the first frame repeated (replicate padding). Strided slices, not an index tensor:
        # the backward of advanced indexing (index_put) is several times slower on CPU.
        n = (T - 1) // s
        padded = torch.cat([x[:, :1].expand(B, k - 1, C, H, W), x], dim=1)  # [B, T+k-1, C, H, W]
        taps = [padded[:, s + i : s + i + (n - 1) * s + 1 : s] for i in range(k)]  # k x [B, n, C, H, W]
        windows = torch.stack(taps, dim=2)  # [B, n, k, C, H, W]
        rest = F.conv2d(windows.reshape(B * n, k * C, H, W), self.weight.reshape(O, k * C)[:, :, None, None], self.bias)
        return torch.cat([first[:, None], rest.view(B, n, O, H, W)], dim=1)  # [B, T', O, H, W]


class SpaceTimeConv(nn.Module):
    """A 3x3 convolution on each frame followed by a causal temporal convolution ((2+1)D, "inflated")."""

    def __init__(self, in_channels: int, out_channels: int, spatial_stride: int = 1, temporal_stride: int = 1) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(in_channels, out_channels, 3, stride=spatial_stride, padding=1)
        self.temporal = CausalTemporalConv(out_channels, out_channels, 3, stride=temporal_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T',O,H/stride,W/stride]."""
        B, T = x.shape[:2]
        h = self.spatial(x.flatten(0, 1))  # [B*T, O, H', W']
        return self.temporal(h.view(B, T, *h.shape[1:]))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, so normalising never mixes information across time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T,C,H,W]."""
        return super().forward(x.flatten(0, 1)).view(x.shape)


class ResBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, space-time conv) x 2, 1x1 skip when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = SpaceTimeConv(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = SpaceTimeConv(out_channels, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T,O,H,W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.skip is not None:
            x = self.skip(x.flatten(0, 1)).view(h.shape)
        return x + h


class FrameAttention(nn.Module):
    """Single-head self-attention among the positions of each frame (residual)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T,C,H,W]."""
        B, T, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).flatten(0, 1)).view(B * T, 3, C, H * W).transpose(2, 3)  # [BT, 3, HW, C]
        out = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3])  # [BT, 1, HW, C]
        out = self.proj(out[:, 0].transpose(1, 2).reshape(B * T, C, H, W))
        return x + out.view(x.shape)


class Downsample(nn.Module):
    """Halve H and W (and T, causally, when `temporal`) with a strided space-time convolution."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.conv = SpaceTimeConv(channels, channels, spatial_stride=2, temporal_stride=2 if temporal else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T',C,H/2,W/2], T' = 1 + (T-1)/2 when temporal else T."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (and T when `temporal`) by nearest repetition, then a space-time convolution.

    In time the first frame stays one frame and every later frame becomes two, mirroring the
    encoder: T -> 1 + 2(T-1), and frame 0 of the output still depends on latent frame 0 only.
    The convolution already narrows to the next level's width: at the higher resolution a
    convolution at the old width would be the costliest layer of the decoder.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = SpaceTimeConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T',O,2H,2W]."""
        if self.temporal and x.shape[1] > 1:
            x = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(2, dim=1)], dim=1)  # [B, 1+2(T-1), C, H, W]
        B, T = x.shape[:2]
        h = F.interpolate(x.flatten(0, 1), scale_factor=2.0, mode="nearest")  # [B*T, C, 2H, 2W]
        return self.conv(h.view(B, T, *h.shape[1:]))


def _middle(channels: int, groups: int, attention: bool) -> nn.Sequential:
    """ResBlock, optional frame attention, ResBlock (the bottleneck of encoder and decoder)."""
    layers: list[nn.Module] = [ResBlock(channels, channels, groups)]
    if attention:
        layers.append(FrameAttention(channels, groups))
    layers.append(ResBlock(channels, channels, groups))
    return nn.Sequential(*layers)


#################################################################################
#                             Encoder, decoder, VAE                             #
#################################################################################


class Encoder(nn.Module):
    """Pixels [B,T,3,H,W] -> posterior parameters [B,T',2*Cl,h,w] (mean and log-variance stacked)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mults]
        levels = len(widths)
        # Time is halved at the deepest downsampling levels, where features are widest.
        temporal = set(range(levels - 1 - config.temporal_levels, levels - 1))
        self.conv_in = SpaceTimeConv(config.in_channels, widths[0])
        self.levels = nn.ModuleList()
        previous = widths[0]
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(
                *(ResBlock(previous if j == 0 else width, width, config.norm_groups) for j in range(config.layers_per_block))
            )
            level.down = Downsample(width, temporal=i in temporal) if i < levels - 1 else nn.Identity()
            self.levels.append(level)
            previous = width
        self.middle = _middle(previous, config.norm_groups, config.attention)
        self.norm_out = FrameGroupNorm(config.norm_groups, previous, eps=1e-6)
        self.conv_out = SpaceTimeConv(previous, 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,3,H,W] -> [B,T',2*Cl,H/s,W/s]."""
        h = self.conv_in(x)  # [B, T, C0, H, W]
        for level in self.levels:
            h = level.down(level.blocks(h))  # width grows, H/W (and maybe T) shrink
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B,T',Cl,h,w] -> pixels [B,T,3,H,W]; the encoder's mirror image."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mults][::-1]  # deepest first
        levels = len(widths)
        temporal = set(range(config.temporal_levels))  # mirror: the deepest upsamplings double time
        self.conv_in = SpaceTimeConv(config.latent_channels, widths[0])
        self.middle = _middle(widths[0], config.norm_groups, config.attention)
        self.levels = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.Sequential(*(ResBlock(width, width, config.norm_groups) for _ in range(config.layers_per_block)))
            level.up = Upsample(width, widths[i + 1], temporal=i in temporal) if i < levels - 1 else nn.Identity()
            self.levels.append(level)
        self.norm_out = FrameGroupNorm(config.norm_groups, widths[-1], eps=1e-6)
        self.conv_out = SpaceTimeConv(widths[-1], config.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,T',Cl,h,w] -> [B,T,3,h*s,w*s]."""
        h = self.middle(self.conv_in(z))
        for level in self.levels:
            h = level.up(level.blocks(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """Causal VAE over [B,C,T,H,W] pixels in [-1,1]; images are T=1 videos."""

    # Bounds on the predicted log-variance: keeps exp() finite early in training.
    LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
    INITIAL_LOGVAR = -6.0

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise all weights; call again after ``to_empty`` when the model was built on the meta device.

        Spatial convolutions get PyTorch's default (Kaiming-uniform) init; temporal convolutions
        start as the identity on the current frame, so the untrained model is a per-frame image
        autoencoder and learns to use time from there; the second convolution of every residual
        block starts at zero, so each block starts as the identity and deep stacks train stably.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm, CausalTemporalConv)):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.spatial.weight)
                nn.init.zeros_(module.conv2.spatial.bias)
            elif isinstance(module, FrameAttention):
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
        # Start the posterior narrow (std e^-3 ~ 0.05): with logvar ~ 0 at init, the decoder would
        # see latents drowned in unit noise and spend its first hundreds of steps waiting for the
        # encoder to shrink it. The KL term still pulls logvar up as far as reconstruction allows.
        with torch.no_grad():
            self.encoder.conv_out.spatial.bias[self.config.latent_channels :].fill_(self.INITIAL_LOGVAR)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a [frames, height, width] clip."""
        return self.config.latent_shape(frames, height, width)

    def _check_pixels(self, x: torch.Tensor) -> None:
        """Clear errors for tensors this model cannot encode."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected pixels [B, {cfg.in_channels}, T, H, W] (an image is T=1), got {list(x.shape)}")
        check_pixel_shape(cfg, *x.shape[2:])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of pixels x [B,3,T,H,W] in [-1,1]: (mean, logvar), each [B,Cl,T',H/s,W/s]."""
        self._check_pixels(x)
        moments = self.encoder(x.transpose(1, 2))  # [B, T', 2*Cl, h, w]
        mean, logvar = moments.transpose(1, 2).chunk(2, dim=1)  # [B, Cl, T', h, w] each
        return mean, logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B,Cl,T',h,w] -> pixels [B,3,1+k(T'-1),h*s,w*s] (not clamped)."""
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"expected latents [B, {cfg.latent_channels}, T', h, w], got {list(z.shape)}")
        return self.decoder(z.transpose(1, 2)).transpose(1, 2)  # [B, 3, T, H, W]

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x [B,3,T,H,W] -> (reconstruction [B,3,T,H,W], mean, logvar [B,Cl,T',h,w]).

        With `sample_posterior` the decoder sees mean + std * noise (noise from `generator` if
        given, drawn on the generator's device), otherwise the mean.
        """
        mean, logvar = self.encode(x)
        z = mean
        if sample_posterior:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z), mean, logvar


#################################################################################
#                              Autoencoder Configs                              #
#################################################################################

PRESETS: dict[str, AutoencoderConfig] = {
    # Unit tests: 2x space, 2x time, a forward/backward pass in milliseconds on CPU.
    "tiny": AutoencoderConfig(latent_channels=4, base_channels=8, channel_mults=(1, 2), layers_per_block=1,
                              temporal_downsample=2, norm_groups=4),
    # CPU demo on 32x32 clips: 4x space, 4x time, 8 latent channels (32x32x3 -> 8x8x8 per latent frame).
    "demo": AutoencoderConfig(latent_channels=8, base_channels=32, channel_mults=(1, 2, 2), layers_per_block=1,
                              temporal_downsample=4, norm_groups=8),
    # Movie Gen TAE compression (8x in T, H and W, 16 channels) on an SD-VAE-sized backbone
    # (128 base, 1-2-4-4, two blocks per level, middle attention); build it on the meta device.
    "moviegen-tae": AutoencoderConfig(latent_channels=16, base_channels=128, channel_mults=(1, 2, 4, 4),
                                      layers_per_block=2, temporal_downsample=8, attention=True, norm_groups=32),
}


def build(config: AutoencoderConfig, device: torch.device | str | None = None) -> Autoencoder:
    """Instantiate an :class:`Autoencoder`; ``device="meta"`` allocates no memory (for sizing big presets)."""
    if device is None:
        return Autoencoder(config)
    with torch.device(device):
        return Autoencoder(config)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not); works on meta-device models."""
    return sum(p.numel() for p in model.parameters())
