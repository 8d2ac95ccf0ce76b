"""Diffusion Transformer (DiT) generator for images and videos, with Llama-style blocks, 3D RoPE and text
cross-attention; ``models.dit.flops`` plans parameters and FLOPs of its presets."""

from models.dit.model import PRESETS, DiT, DiTConfig, apply_rope, build, parameter_count, rope_angles, rope_split

__all__ = ["PRESETS", "DiT", "DiTConfig", "apply_rope", "build", "parameter_count", "rope_angles", "rope_split"]
