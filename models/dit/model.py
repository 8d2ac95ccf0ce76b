"""Text-conditioned Diffusion Transformer that predicts flow-matching velocity.

Layout follows DiT (Peebles & Xie, 2023) with the changes Movie Gen / Emu-style models make:
Llama-style blocks (RMSNorm, SwiGLU), cross-attention to text tokens, and adaLN-zero
modulation driven by the timestep plus a pooled text embedding. The modulation MLP is shared
by all blocks with a learned per-block offset (PixArt-alpha's "adaLN-single"), which is what
keeps the 30B preset near 30B parameters: a full per-block adaLN would add 6*width^2 per layer.
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

    image_size: int = 32  # side of the square input in pixels (or latent cells)
    in_channels: int = 3  # channels of the input, 3 for RGB pixels, e.g. 16 for a video VAE latent
    patch_size: int = 4  # side of the square patch that becomes one token
    width: int = 192  # transformer hidden size
    depth: int = 6  # number of transformer blocks
    heads: int = 6  # attention heads; width must divide evenly
    mlp_ratio: float = 4.0  # nominal MLP expansion; SwiGLU uses 2/3 of it so params match a GELU MLP
    text_dim: int = 384  # width of the text encoder's token embeddings (MiniLM-L6 = 384)
    max_text_tokens: int = 32  # caption length the text encoder pads/truncates to
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "in_channels",
            "patch_size",
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
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"grad_checkpointing must be a bool, got {self.grad_checkpointing!r}")
        if self.width % self.heads != 0:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.width % 4 != 0:
            raise ValueError(f"width ({self.width}) must be divisible by 4 for the 2D sin-cos positional embedding")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")

    @property
    def grid_size(self) -> int:
        """Number of patches per side."""
        return self.image_size // self.patch_size

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


def sincos_pos_embed_2d(width: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding [grid_size**2, width], row-major over the patch grid."""
    # Always computed on CPU: it is tiny, and a meta/CUDA device context must not change its values.
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device="cpu") / quarter)  # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        """Positions [G, G] -> [G*G, D/2] sin/cos features."""
        out = pos.reshape(-1, 1) * omega[None]  # [G*G, D/4]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [G*G, D/2]

    return torch.cat([embed_1d(grid_h), embed_1d(grid_w)], dim=1).float()  # [G*G, D]


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over heads: q [B,H,N,d], k/v [B,H,L,d], mask [B,1,1,L] bool (True = attend) -> [B,N,H*d]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, d]
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens with QK RMSNorm."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        # QK-norm bounds attention logits, which keeps large models stable under bf16.
        self.q_norm = RMSNorm(width // heads, eps=1e-6)
        self.k_norm = RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
        q, k, v = qkv.unbind(0)
        return self.proj(_attend(self.q_norm(q), self.k_norm(k), v, None))


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
        self, x: torch.Tensor, modulation: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B,N,D], modulation [B,6,D], context [B,L,D], context_mask [B,L] -> [B,N,D]."""
        mod = self.scale_shift_table[None].to(modulation.dtype) + modulation  # [B, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # each [B, D]
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear projection of tokens back to patch pixels."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B,N,D], c [B,D] -> [B,N,p*p*C]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer mapping (x_t, t, text) to a flow-matching velocity of the same shape as x_t."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.width
        self.patch_embed = nn.Conv2d(config.in_channels, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.text_dim, D), nn.SiLU(), nn.Linear(D, D))
        # Projecting text once to the model width keeps per-block cross-attention square (width x width),
        # matching Movie Gen's parameter budget and letting the text encoder be swapped by changing text_dim.
        self.text_embedder = nn.Sequential(nn.Linear(config.text_dim, D), RMSNorm(D, eps=1e-6))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_hidden) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.in_channels)
        # Fixed and derived from the config, so kept out of the state dict and out of checkpoints.
        self.register_buffer("pos_embed", torch.zeros(1, config.grid_size**2, D), persistent=False)
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

        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(self.config.width, self.config.grid_size)[None])

        # Treat the patch embedding like a linear layer over flattened patches (as in DiT/MAE).
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder[0].weight, std=0.02)
        nn.init.normal_(self.pooled_embedder[2].weight, std=0.02)

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

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, p*p*C] -> image [B, C, H, W]."""
        p, C, G = self.config.patch_size, self.config.in_channels, self.config.grid_size
        B = x.shape[0]
        x = x.view(B, G, G, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)  # [B, C, G, p, G, p]
        return x.reshape(B, C, G * p, G * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
    ) -> torch.Tensor:
        """Predict velocity.

        x [B,C,H,W] noisy sample, t [B] flow time in [0,1] (0 = noise, 1 = data),
        text_tokens [B,L,text_dim], text_mask [B,L] bool (True = real token),
        text_pooled [B,text_dim] -> velocity [B,C,H,W].
        """
        cfg = self.config
        if x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected x of shape [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], got {list(x.shape)}"
            )
        B = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        # Under autocast the conv returns bf16; keeping the residual stream in the parameter dtype
        # (float32 for mixed precision) avoids accumulating rounding error across blocks.
        h = h.to(self.pos_embed.dtype) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.pooled_embedder(text_pooled.to(self.pooled_embedder[0].weight.dtype))  # [B, D]
        modulation = self.adaLN_modulation(c).view(B, 6, cfg.width)  # [B, 6, D]
        context = self.text_embedder(text_tokens.to(self.text_embedder[0].weight.dtype))  # [B, L, D]
        text_mask = text_mask.bool()
        use_checkpoint = cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                h = checkpoint(block, h, modulation, context, text_mask, use_reentrant=False)
            else:
                h = block(h, modulation, context, text_mask)  # [B, N, D]
        h = self.final_layer(h, c)  # [B, N, p*p*C]
        return self.unpatchify(h)  # [B, C, H, W]


#################################################################################
#                                  DiT Configs                                  #
#################################################################################

PRESETS: dict[str, DiTConfig] = {
    # Unit tests: a forward/backward pass takes milliseconds on CPU.
    "tiny": DiTConfig(image_size=16, patch_size=4, width=64, depth=2, heads=2),
    # Laptop demo on 32x32 RGB pixels.
    "demo": DiTConfig(image_size=32, patch_size=4, width=192, depth=6, heads=6),
    # DiT-S width/depth/heads.
    "dit-s": DiTConfig(image_size=32, patch_size=4, width=384, depth=12, heads=6),
    # Movie Gen 30B transformer shape (48 layers, 6144 wide, 48 heads, SwiGLU hidden 16384) on a
    # 16-channel latent of a 768px frame; build it on torch.device("meta") to inspect it.
    "moviegen-30b": DiTConfig(image_size=96, in_channels=16, patch_size=2, width=6144, depth=48, heads=48),
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
