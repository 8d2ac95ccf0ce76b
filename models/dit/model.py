"""Text-conditioned Diffusion Transformer that predicts flow-matching velocity for images and videos.

Layout follows DiT (Peebles & Xie, 2023) with the changes Movie Gen / Emu-style models make:
Llama-style blocks (RMSNorm, SwiGLU), cross-attention to text tokens, and adaLN-zero
modulation driven by the timestep plus a pooled text embedding. The modulation MLP is shared
by all blocks with a learned per-block offset (PixArt-alpha's "adaLN-single"), which is what
keeps the 30B preset near 30B parameters: a full per-block adaLN would add 6*width^2 per layer.

One model serves text-to-image and text-to-video (Movie Gen): the input is a (latent) video
[B, C, T, H, W] and an image is the T=1 case. Tokens are T x H x W patches of
(patch_size_t, patch_size, patch_size) cells, and position enters only through factorized 3D
rotary embeddings on the self-attention queries and keys, so nothing is tied to a grid: any
T, H, W divisible by the patch (aspect-ratio buckets, clip lengths, resolution stages) runs
through the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass(frozen=True)
class DiTConfig:
    """Architecture hyper-parameters of a :class:`DiT`; validated on construction."""

    image_size: int = 32  # default side of a sample in pixels (or latent cells); any multiple of patch_size runs
    frames: int = 1  # default frames of a sample in latent frames (1 = image); any multiple of patch_size_t runs
    in_channels: int = 3  # channels of the input, 3 for RGB pixels, e.g. 16 for a video VAE latent
    patch_size: int = 4  # height and width of the patch that becomes one token
    patch_size_t: int = 1  # frames per patch; 1 keeps every latent frame its own token row (Movie Gen)
    width: int = 192  # transformer hidden size
    depth: int = 6  # number of transformer blocks
    heads: int = 6  # attention heads; width must divide evenly into an even head_dim >= 6 (3D RoPE)
    mlp_ratio: float = 4.0  # nominal MLP expansion; SwiGLU uses 2/3 of it so params match a GELU MLP
    text_dim: int = 384  # width of the text encoder's token embeddings (MiniLM-L6 = 384)
    max_text_tokens: int = 32  # caption length the text encoder pads/truncates to
    rope_theta: float = 10000.0  # RoPE base: the longest wavelength is ~2*pi*theta patches, far beyond any grid
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    guidance_embed: bool = False  # take the CFG scale as an input (a guidance-distilled student: one pass per step)

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "frames",
            "in_channels",
            "patch_size",
            "patch_size_t",
            "width",
            "depth",
            "heads",
            "text_dim",
            "max_text_tokens",
        ):
            value = getattr(self, name)
            # bool is an int subclass; True as a width is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if (
            not isinstance(self.rope_theta, (int, float))
            or isinstance(self.rope_theta, bool)
            or not self.rope_theta > 1
        ):
            raise ValueError(f"rope_theta must be a number > 1, got {self.rope_theta!r}")
        for flag in ("grad_checkpointing", "guidance_embed"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.width % self.heads != 0:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        head_dim = self.width // self.heads
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(
                f"width/heads = head_dim ({self.width}/{self.heads} = {head_dim}) must be even and at least 6: "
                "3D RoPE splits each head into t, h and w parts of even size (see rope_split)"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.frames % self.patch_size_t != 0:
            raise ValueError(f"frames ({self.frames}) must be divisible by patch_size_t ({self.patch_size_t})")

    @property
    def grid_size(self) -> int:
        """Number of patches per side of a default-sized sample."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.width // self.heads

    @property
    def patch_volume(self) -> int:
        """Latent cells per token: patch_size_t * patch_size**2."""
        return self.patch_size_t * self.patch_size * self.patch_size

    def sample_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        """Default sample shape [B, C, frames, image_size, image_size]."""
        return (batch_size, self.in_channels, self.frames, self.image_size, self.image_size)

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size: 2/3 of mlp_ratio*width, rounded up to a multiple of 64 (Llama convention)."""
        hidden = int(2 * self.mlp_ratio * self.width / 3)
        return 64 * math.ceil(hidden / 64)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        """Build from :meth:`to_dict` output; unknown keys raise so stale configs fail loudly."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {', '.join(unknown)}")
        return cls(**data)


#################################################################################
#                       Embedding layers for timesteps and text                 #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, so bf16 autocast neither loses precision nor
    hits the slow mixed-dtype path of ``torch.rms_norm``."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def reset_parameters(self) -> None:
        """Unit gain."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim], same dtype as x."""
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), (self.dim,), weight, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x [B,N,D] by per-sample shift/scale [B,D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# The guidance embedder reads scale / GUIDANCE_SCALE_RANGE through the timestep sinusoids (built for 0..1).
GUIDANCE_SCALE_RANGE = 10.0


class TimestepEmbedder(nn.Module):
    """Embeds scalar flow time t in [0, 1] into a width-sized vector."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features of t [B] -> [B, dim]."""
        # t lives in [0, 1]; scaling to the DDPM range [0, 1000] spreads it over the same
        # frequencies the DiT recipe was tuned for.
        t = t.float() * 1000.0
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None] * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, width]."""
        freq = self.sinusoidal(t, self.frequency_dim)  # [B, frequency_dim]
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the (t, h, w) rotary axes; each part is even.

    h and w get 2*(head_dim//6) each and t takes the rest (the split Wan 2.1 uses): spatial
    axes are equal so a transposed aspect ratio is treated alike, and time gets the remainder,
    which is never smaller. head_dim=128 -> (44, 42, 42); head_dim=32 -> (12, 10, 10).
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"head_dim must be even and at least 6 for 3D RoPE, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(
    frames: int, height: int, width: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Rotation angles [frames*height*width, head_dim/2] (float32) for a token grid, t-major then h then w.

    Each axis gets its own block of frequencies theta**(-2i/d_axis) over its share of the head
    (see :func:`rope_split`), multiplied by the token's integer patch index along that axis.
    Positions are plain indices, not rescaled to the grid: a score then depends only on the
    offset between two tokens, so a 16x16-trained model runs on 32x32 unchanged and sees the
    same neighbourhoods; offsets it never saw (beyond 15) are learned in the higher-resolution
    stage, as in Movie Gen's progressive training. An image (frames=1) has t=0 everywhere, so
    the time part is the identity and image tokens are the first frame of a video.
    """
    parts = rope_split(head_dim)
    angles = []
    for size, dim in zip((frames, height, width), parts):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)  # [dim/2]
        pos = torch.arange(size, dtype=torch.float64, device=device)
        angles.append((pos[:, None] * freqs[None]).float())  # [size, dim/2]
    t, h, w = angles
    grid = [
        t[:, None, None, :].expand(frames, height, width, -1),
        h[None, :, None, :].expand(frames, height, width, -1),
        w[None, None, :, :].expand(frames, height, width, -1),
    ]
    return torch.cat(grid, dim=-1).reshape(frames * height * width, head_dim // 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [..., N, d] by angles with cos/sin [N, d/2].

    Done in float32 and cast back, so bf16 autocast does not round the rotation of far
    positions (bf16 keeps ~3 significant digits, too few for angles in the hundreds).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # [..., N, d/2, 2]
    x0, x1 = xf.unbind(-1)  # [..., N, d/2] each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [..., N, d/2, 2]
    return out.flatten(-2).to(x.dtype)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over heads: q [B,H,N,d], k/v [B,H,L,d], mask [B,1,1,L] bool (True = attend) -> [B,N,H*d]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, d]
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over video tokens with QK RMSNorm and 3D RoPE on q and k."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        # QK-norm bounds attention logits, which keeps large models stable under bf16.
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B,N,D], rope (cos, sin) each [N, d/2] float32 -> [B,N,D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
        q, k, v = qkv.unbind(0)
        # Rotate after QK-norm: the norm's gain would otherwise rescale the rotated pairs unevenly.
        q = apply_rope(self.q_norm(q), *rope)  # [B, H, N, d]
        k = apply_rope(self.k_norm(k), *rope)
        return self.proj(_attend(q, k, v, None))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to (projected) text tokens, honouring padding."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """x [B,N,D], context [B,L,D], context_mask [B,L] bool (True = real token) -> [B,N,D]."""
        B, N, D = x.shape
        L = context.shape[1]
        d = D // self.heads
        q = self.q(x).view(B, N, self.heads, d).transpose(1, 2)  # [B, H, N, d]
        kv = self.kv(context).view(B, L, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # [2, B, H, L, d]
        k, v = kv.unbind(0)
        # A caption with no real tokens would make softmax over an all-masked row NaN; let such
        # rows attend to everything and then zero their output, so "no text" contributes nothing.
        has_text = context_mask.any(dim=1)  # [B]
        mask = context_mask | ~has_text[:, None]  # [B, L]
        out = _attend(self.q_norm(q), self.k_norm(k), v, mask[:, None, None, :])  # [B, N, D]
        out = out * has_text[:, None, None].to(out.dtype)
        return self.proj(out)


class SwiGLU(nn.Module):
    """Gated MLP from Llama: w2(silu(w1 x) * w3 x)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Self-attention, text cross-attention and SwiGLU MLP, with adaLN-zero on attention and MLP."""

    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        # Modulated norms carry no affine weights: adaLN's scale/shift take that role.
        self.norm1 = RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(width, heads)
        self.norm_cross = RMSNorm(width, eps=1e-6)
        self.cross_attn = CrossAttention(width, heads)
        self.norm2 = RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(width, mlp_hidden)
        # Per-block offset added to the shared modulation (adaLN-single).
        self.scale_shift_table = nn.Parameter(torch.zeros(6, width))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x [B,N,D], modulation [B,6,D], context [B,L,D], context_mask [B,L], rope 2x[N,d/2] -> [B,N,D]."""
        mod = self.scale_shift_table[None].to(modulation.dtype) + modulation  # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # each [B, D]
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear projection of tokens back to patch cells."""

    def __init__(self, width: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B,N,D], c [B,D] -> [B,N,pt*p*p*C]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer mapping (x_t, t, text) to a flow-matching velocity of the same shape as x_t.

    x_t is a (latent) video [B, C, T, H, W]; an image is T=1, and a 4D [B, C, H, W] input is
    accepted as an image and answered in 4D.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.width
        # A linear layer over flattened (C, pt, p, p) patches: the same map and weight layout as a
        # Conv3d with kernel = stride = patch, but ~10x faster in backward on CPU.
        self.patch_embed = nn.Linear(config.in_channels * config.patch_volume, D)
        self.t_embedder = TimestepEmbedder(D)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        # Guidance distillation (Meng et al. 2023): the CFG scale joins the conditioning vector like t does.
        self.guidance_embedder = TimestepEmbedder(D) if config.guidance_embed else None
        # Projecting text once to the model width keeps per-block cross-attention square (width x width),
        # matching Movie Gen's parameter budget and letting the text encoder be swapped by changing text_dim.
        self.text_embedder = nn.Sequential(nn.Linear(config.text_dim, D), RMSNorm(D, eps=1e-6))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_hidden) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_volume, config.in_channels)
        # RoPE cos/sin per token grid: derived from the config, so kept out of the state dict.
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise all weights; call again after ``to_empty`` when the model was built on the meta device."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

        self.apply(_basic_init)
        self._rope_cache.clear()

        # The patch embedding is a linear layer over flattened patches, so _basic_init covers it (as in DiT/MAE).

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder[0].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder[2].weight, std=0.02)
        if self.guidance_embedder is not None:
            # Zero output: a student copied from a teacher starts as the teacher's conditional prediction.
            nn.init.normal_(self.guidance_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.guidance_embedder.mlp[2].weight)
            nn.init.zeros_(self.guidance_embedder.mlp[2].bias)

        # adaLN-zero: every gate and the output projection start at zero, so each block is the
        # identity on its residual path and the untrained model predicts exactly zero velocity.
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.scale_shift_table)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Accept checkpoints of the image-only DiT, whose patch embedding was a Conv2d [D, C, p, p]."""
        key = prefix + "patch_embed.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.ndim > 2:
            state_dict[key] = weight.flatten(1)  # [D, C*pt*p*p]: the conv kernel read as one row per output
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def rope(self, frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [frames*height*width, head_dim/2] float32 for a token grid, cached per grid and device."""
        # Tensors made under inference_mode cannot be saved for backward later, so they get their own entry.
        key = (frames, height, width, str(device), torch.is_inference_mode_enabled())
        cached = self._rope_cache.get(key)
        if cached is None:
            cfg = self.config
            angles = rope_angles(frames, height, width, cfg.head_dim, cfg.rope_theta, device=device)
            cached = (torch.cos(angles), torch.sin(angles))
            if len(self._rope_cache) >= 32:  # a handful of buckets in practice; bound it anyway
                self._rope_cache.clear()
            self._rope_cache[key] = cached
        return cached

    def patch_grid(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (T/pt, H/p, W/p) of an input shaped [B,C,T,H,W] or [B,C,H,W]; ValueError names what is wrong."""
        cfg = self.config
        if len(shape) not in (4, 5):
            raise ValueError(f"expected x of shape [B, C, T, H, W] or [B, C, H, W], got {list(shape)}")
        if shape[1] != cfg.in_channels:
            raise ValueError(f"expected x with {cfg.in_channels} channels in dim 1, got shape {list(shape)}")
        T, H, W = (1, *shape[2:]) if len(shape) == 4 else shape[2:]
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        if T % patch[0] or H % patch[1] or W % patch[2]:
            raise ValueError(
                f"expected frames, height, width divisible by the patch {patch} (T x H x W), "
                f"got {(T, H, W)} from x of shape {list(shape)}"
            )
        return T // patch[0], H // patch[1], W // patch[2]

    def patchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Video [B, C, T, H, W] -> tokens [B, T'*H'*W', C*pt*p*p], t-major then h then w."""
        cfg = self.config
        pt, p = cfg.patch_size_t, cfg.patch_size
        T, H, W = grid
        B, C = x.shape[:2]
        x = x.reshape(B, C, T, pt, H, p, W, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, pt, p, p]
        return x.reshape(B, T * H * W, C * pt * p * p)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens [B, N, pt*p*p*C] on a (T', H', W') grid -> video [B, C, T'*pt, H'*p, W'*p]."""
        cfg = self.config
        pt, p, C = cfg.patch_size_t, cfg.patch_size, cfg.in_channels
        T, H, W = grid
        B = x.shape[0]
        x = x.view(B, T, H, W, pt, p, p, C)
        x = torch.einsum("bthwopqc->bctohpwq", x)  # [B, C, T', pt, H', p, W', p]
        return x.reshape(B, C, T * pt, H * p, W * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict velocity.

        x [B,C,T,H,W] noisy video (T=1 for an image; [B,C,H,W] is read as T=1 and answered in 4D),
        t [B] flow time in [0,1] (0 = noise, 1 = data), text_tokens [B,L,text_dim],
        text_mask [B,L] bool (True = real token), text_pooled [B,text_dim], guidance [B] CFG scale
        (required with ``guidance_embed``, refused without) -> velocity shaped like x.
        """
        cfg = self.config
        grid = self.patch_grid(tuple(x.shape))  # (T', H', W')
        image_input = x.ndim == 4
        if image_input:
            x = x.unsqueeze(2)  # [B, C, 1, H, W]
        B = x.shape[0]
        param_dtype = self.t_embedder.mlp[0].weight.dtype
        h = self.patchify(x, grid)  # [B, N, C*pt*p*p], N = T'*H'*W'
        # Under autocast the linear returns bf16; keeping the residual stream in the parameter dtype
        # (float32 for mixed precision) avoids accumulating rounding error across blocks.
        h = self.patch_embed(h).to(param_dtype)  # [B, N, D]
        rope = self.rope(*grid, device=h.device)  # (cos, sin) [N, d/2] each
        c = self.t_embedder(t) + self.pooled_embedder(text_pooled.to(self.pooled_embedder[0].weight.dtype))  # [B, D]
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model was guidance-distilled (guidance_embed): pass guidance [B]")
            # Scales 0..10 map to the same sinusoid range as t in 0..1.
            c = c + self.guidance_embedder(guidance.to(t.device).float().expand(B) / GUIDANCE_SCALE_RANGE)  # [B, D]
        elif guidance is not None:
            raise ValueError("guidance was passed to a model without guidance_embed; use classifier-free guidance")
        modulation = self.adaLN_modulation(c).view(B, 6, cfg.width)  # [B, 6, D]
        context = self.text_embedder(text_tokens.to(self.text_embedder[0].weight.dtype))  # [B, L, D]
        text_mask = text_mask.bool()
        use_checkpoint = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                h = checkpoint(block, h, modulation, context, text_mask, rope, use_reentrant=False)
            else:
                h = block(h, modulation, context, text_mask, rope)  # [B, N, D]
        h = self.final_layer(h, c)  # [B, N, pt*p*p*C]
        out = self.unpatchify(h, grid)  # [B, C, T, H, W]
        return out[:, :, 0] if image_input else out


#################################################################################
#                                  DiT Configs                                  #
#################################################################################

PRESETS: dict[str, DiTConfig] = {
    # Unit tests: a forward/backward pass takes milliseconds on CPU.
    "tiny": DiTConfig(image_size=16, patch_size=4, width=64, depth=2, heads=2),
    # Laptop demo on 32x32 RGB pixels (8x8 = 64 tokens per image).
    "demo": DiTConfig(image_size=32, patch_size=4, width=192, depth=6, heads=6),
    # Laptop demo on latents: the 8x8x8 latent of a 32 px frame under a 4x autoencoder, one token
    # per latent cell (64 tokens per frame, as "demo"), so videos cost T times an image.
    "demo-latent": DiTConfig(image_size=8, in_channels=8, patch_size=1, patch_size_t=1, width=192, depth=6, heads=6),
    # DiT-S width/depth/heads on 32x32 RGB pixels.
    "dit-s": DiTConfig(image_size=32, patch_size=4, width=384, depth=12, heads=6),
    # DiT-B/2, DiT-L/2, DiT-XL/2 shapes on the 32x32x16 latent of a 256 px frame (8x autoencoder).
    "dit-b": DiTConfig(image_size=32, in_channels=16, patch_size=2, width=768, depth=12, heads=12),
    "dit-l": DiTConfig(image_size=32, in_channels=16, patch_size=2, width=1024, depth=24, heads=16),
    "dit-xl": DiTConfig(image_size=32, in_channels=16, patch_size=2, width=1152, depth=28, heads=16),
    # Movie Gen 30B transformer shape (48 layers, 6144 wide, 48 heads of 128, SwiGLU hidden 16384)
    # on the 16-channel TAE latent (8x in T, H, W) of a 16 s, 16 fps, 768x768 clip: 32 x 96 x 96
    # latent cells, patch 1x2x2 -> 32*48*48 = 73,728 tokens. Build it on torch.device("meta").
    "moviegen-30b": DiTConfig(
        image_size=96, frames=32, in_channels=16, patch_size=2, patch_size_t=1, width=6144, depth=48, heads=48
    ),
}


def build(config: DiTConfig, device: torch.device | str | None = None) -> DiT:
    """Instantiate a :class:`DiT`; ``device="meta"`` allocates no memory (for sizing huge presets)."""
    if device is None:
        return DiT(config)
    with torch.device(device):
        return DiT(config)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not); works on meta-device models."""
    return sum(p.numel() for p in model.parameters())
