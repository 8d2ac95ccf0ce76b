"""Diffusion Transformer (DiT) generator with Llama-style blocks and text cross-attention."""

from models.dit.model import PRESETS, DiT, DiTConfig, build, parameter_count

__all__ = ["PRESETS", "DiT", "DiTConfig", "build", "parameter_count"]
