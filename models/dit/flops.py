"""Parameter and FLOPs planner for :class:`~models.dit.DiT` configs.

Counts are analytic and cover every matrix multiply of a forward pass at 2 FLOPs per
multiply-accumulate: each linear layer (patch embedding included), plus the attention score
and weighted-sum products (self-attention 4*N^2*D per layer per sample, cross-attention
4*N*L*D). Norms, activations, RoPE and softmax are elementwise and left out (well under 1% at
any size worth planning). ``tests/unit/test_models_dit_flops.py`` checks the count against
``torch.utils.flop_counter.FlopCounterMode``.

Movie Gen's context length. Movie Gen trains its 30B transformer on up to 16 s of 16 fps video
at 768 px, i.e. 256 frames of 768 x 768. Its temporal autoencoder (TAE) compresses 8x in T, H
and W and the transformer patchifies 1 x 2 x 2, so

    frames  256 / 8 = 32 latent frames -> 32 / 1 = 32 token rows
    height  768 / 8 = 96 latent cells  -> 96 / 2 = 48
    width   768 / 8 = 96 latent cells  -> 96 / 2 = 48
    tokens  32 * 48 * 48 = 73,728      ("73K tokens" in the paper)

which is :data:`MOVIEGEN_TOKENS`. (Under reelforge's causal autoencoder convention a clip of
T frames gives 1 + (T-1)/8 latent frames, so the equivalent input is 257 frames -> 33 latent
frames -> 76,032 tokens; the paper's figure is used as the default.)

Run ``python -m models.dit.flops [preset] [--tokens N]`` to print a plan.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from models.dit.model import PRESETS, DiTConfig, build

MOVIEGEN_TOKENS = 32 * 48 * 48  # 73,728: 256 frames of 768x768 -> TAE 8x T/H/W -> patch 1x2x2 (see module doc)

# Width of the sinusoidal timestep features fed to the timestep MLP (TimestepEmbedder default).
_TIMESTEP_FREQUENCY_DIM = 256


def token_count(config: DiTConfig, frames: int, height: int, width: int) -> int:
    """Transformer tokens for one sample of ``frames x height x width`` latent cells (what DiT.forward sees)."""
    for name, value, patch in (
        ("frames", frames, config.patch_size_t),
        ("height", height, config.patch_size),
        ("width", width, config.patch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        if value % patch:
            raise ValueError(f"{name} ({value}) must be divisible by its patch size ({patch})")
    return (frames // config.patch_size_t) * (height // config.patch_size) * (width // config.patch_size)


def forward_flops_breakdown(config: DiTConfig, tokens: int, text_tokens: int | None = None) -> dict[str, int]:
    """Matmul FLOPs of one forward pass of ONE sample, split into where they go.

    Keys: "embed" (patch, timestep, pooled-text and text-token projections, shared adaLN),
    "blocks_linear" (q/k/v/out projections of both attentions and the SwiGLU MLP),
    "self_attention" (QK^T and AV: 4*N^2*D per layer), "cross_attention" (4*N*L*D per layer),
    "final" (final adaLN and output projection), "total".
    """
    N = tokens
    L = config.max_text_tokens if text_tokens is None else text_tokens
    D = config.width
    hidden = config.mlp_hidden
    patch_dim = config.in_channels * config.patch_volume
    text_dim = config.text_dim
    embed = 2 * (
        N * patch_dim * D  # patch embedding
        + _TIMESTEP_FREQUENCY_DIM * D + D * D  # timestep MLP
        + text_dim * D + D * D  # pooled-text MLP
        + L * text_dim * D  # text token projection
        + D * 6 * D  # shared adaLN modulation
    )
    per_block_linear = 2 * (
        N * D * 3 * D + N * D * D  # self-attention qkv and output projection
        + N * D * D + L * D * 2 * D + N * D * D  # cross-attention q, kv (on text tokens), output projection
        + 3 * N * D * hidden  # SwiGLU w1, w3, w2
    )
    self_attention = config.depth * 4 * N * N * D
    cross_attention = config.depth * 4 * N * L * D
    final = 2 * (D * 2 * D + N * D * patch_dim)
    parts = {
        "embed": embed,
        "blocks_linear": config.depth * per_block_linear,
        "self_attention": self_attention,
        "cross_attention": cross_attention,
        "final": final,
    }
    parts["total"] = sum(parts.values())
    return parts


def forward_flops(config: DiTConfig, batch_size: int, tokens: int, text_tokens: int | None = None) -> int:
    """Matmul FLOPs (2 per multiply-accumulate) of one forward pass over ``batch_size`` samples of ``tokens`` tokens.

    ``text_tokens`` defaults to the config's ``max_text_tokens`` (captions are padded to it).
    """
    return batch_size * forward_flops_breakdown(config, tokens, text_tokens)["total"]


def train_step_flops(
    config: DiTConfig,
    batch_size: int,
    tokens: int,
    text_tokens: int | None = None,
    activation_checkpointing: bool = False,
) -> int:
    """FLOPs of one training step (forward + backward) over ``batch_size`` samples.

    Convention: backward costs twice the forward (one matmul for the input gradient and one for
    the weight gradient per forward matmul), so a step is 3x forward; this is the "model FLOPs"
    that MFU is quoted in. Activation checkpointing recomputes the forward during backward, so
    the hardware does one more forward (4x); pass ``activation_checkpointing=True`` to count it.
    """
    multiplier = 4 if activation_checkpointing else 3
    return multiplier * forward_flops(config, batch_size, tokens, text_tokens)


def parameter_count(config: DiTConfig) -> dict[str, int]:
    """Parameters of the model built on the meta device (no memory): {"total", "non_embedding"}.

    Non-embedding parameters are the transformer proper, the blocks and the shared adaLN
    modulation; the embedding ones (patch, timestep, text projections and the final layer) are
    what change with the input/output format, as in the LLM scaling-law convention.
    """
    model = build(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    core = sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.adaLN_modulation.parameters()
    )
    return {"total": total, "non_embedding": core}


def _human_count(n: int) -> str:
    """E.g. 29378365504 -> '29,378,365,504 (29.38B)'."""
    short = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return f"{n:,} ({short})"


def _human_flops(flops: int) -> str:
    """E.g. 3.05e16 -> '30,468.1 TFLOP (3.05e+16)'."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit} ({flops:.3g})"
    return f"{flops:,} FLOP"


@dataclass(frozen=True)
class Plan:
    """Size and compute of a preset at a context length; FLOPs are matmul FLOPs (see module doc)."""

    preset: str  # name in PRESETS
    tokens: int  # video/image tokens per sample
    text_tokens: int  # text tokens per sample (cross-attention keys)
    batch_size: int  # samples per training step
    params: int  # all parameters
    non_embedding_params: int  # blocks + shared adaLN modulation
    forward_flops_per_sample: int  # one forward of one sample
    train_flops_per_sample: int  # 3x forward (no recompute)
    train_flops_per_step: int  # train_flops_per_sample * batch_size
    attention_share: float  # fraction of forward FLOPs in attention scores/sums (self + cross)
    self_attention_share: float  # fraction in self-attention scores/sums alone

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for printing."""
        return [
            ("preset", self.preset),
            ("tokens per sample", f"{self.tokens:,}"),
            ("text tokens per sample", f"{self.text_tokens:,}"),
            ("batch size", f"{self.batch_size:,}"),
            ("parameters", _human_count(self.params)),
            ("non-embedding parameters", _human_count(self.non_embedding_params)),
            ("forward FLOPs per sample", _human_flops(self.forward_flops_per_sample)),
            ("train step FLOPs per sample (3x fwd)", _human_flops(self.train_flops_per_sample)),
            ("train step FLOPs at batch", _human_flops(self.train_flops_per_step)),
            ("attention share of FLOPs", f"{100 * self.attention_share:.1f}%"),
            ("  of which self-attention", f"{100 * self.self_attention_share:.1f}%"),
        ]

    def table(self) -> str:
        """The plan as an aligned two-column text table."""
        rows = self.rows()
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def plan(
    preset_name: str, tokens: int = MOVIEGEN_TOKENS, text_tokens: int | None = None, batch_size: int = 1
) -> Plan:
    """Parameters and FLOPs of ``PRESETS[preset_name]`` at ``tokens`` tokens per sample.

    Defaults to Movie Gen's 73,728-token context (see module doc) and the preset's
    ``max_text_tokens`` text tokens.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    for name, value in (("tokens", tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    config = PRESETS[preset_name]
    text = config.max_text_tokens if text_tokens is None else text_tokens
    parts = forward_flops_breakdown(config, tokens, text)
    params = parameter_count(config)
    forward = parts["total"]
    return Plan(
        preset=preset_name,
        tokens=tokens,
        text_tokens=text,
        batch_size=batch_size,
        params=params["total"],
        non_embedding_params=params["non_embedding"],
        forward_flops_per_sample=forward,
        train_flops_per_sample=train_step_flops(config, 1, tokens, text),
        train_flops_per_step=train_step_flops(config, batch_size, tokens, text),
        attention_share=(parts["self_attention"] + parts["cross_attention"]) / forward,
        self_attention_share=parts["self_attention"] / forward,
    )


def main(argv: list[str] | None = None) -> None:
    """CLI: print the plan of a preset."""
    parser = argparse.ArgumentParser(prog="python -m models.dit.flops", description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", default="moviegen-30b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=MOVIEGEN_TOKENS, help="tokens per sample (default 73,728)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (default: max_text_tokens)")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    print(plan(args.preset, tokens=args.tokens, text_tokens=args.text_tokens, batch_size=args.batch_size).table())


if __name__ == "__main__":
    main()
