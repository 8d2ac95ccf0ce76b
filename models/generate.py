"""Text-to-image inference from a model directory: prompts in, uint8 images out.

A model directory is the Model artifact contract: `model.safetensors` (EMA weights),
`config.json` (architecture, text encoder, flow settings, the recipe) and `state.json`.
Evaluation, the MLflow pyfunc and the inference server all sample through this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_model_dir
from models.dit import DiT, DiTConfig
from models.flow import sample
from models.text_encoder import TextEmbeddings, TextEncoder


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] floats in [-1,1] -> [B,H,W,C] uint8."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


class TextToImage:
    """A loaded generator with its text encoder; call it with prompts to get images."""

    def __init__(self, model: DiT, text_encoder: TextEncoder, config: dict[str, Any], state: dict[str, Any]) -> None:
        # Left in the caller's train/eval mode: during training this wraps the live EMA module
        # (the DiT has no dropout or norm statistics, so the mode does not change samples).
        self.model = model
        self.text_encoder = text_encoder
        self.config = config
        self.state = state
        self.null_text = text_encoder.encode([""])

    @classmethod
    def from_dir(cls, directory: str | Path, text_encoder: TextEncoder | None = None) -> "TextToImage":
        """Load weights (safetensors only) and config from a model directory."""
        weights, config, state = load_model_dir(Path(directory))
        model = DiT(DiTConfig(**config["model"]))
        model.load_state_dict(weights)
        model.eval()
        encoder = text_encoder or TextEncoder(max_tokens=int(config["text"]["max_tokens"]))
        return cls(model, encoder, config, state)

    @property
    def image_size(self) -> int:
        """Side of the square images this model makes, in pixels."""
        return int(self.model.config.image_size)

    @torch.inference_mode()
    def generate_tensor(
        self,
        prompts: Sequence[str] | TextEmbeddings,
        steps: int = 25,
        guidance: float = 4.0,
        seed: int = 0,
        solver: str = "euler",
        batch_size: int = 32,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images as [B,C,H,W] floats in [-1,1]. Same prompts + seed -> same images."""
        embeddings = prompts if isinstance(prompts, TextEmbeddings) else self.text_encoder.encode(list(prompts))
        generator = torch.Generator().manual_seed(seed)
        config = self.model.config
        outputs = []
        for start in range(0, len(embeddings), batch_size):
            chunk = embeddings.select(slice(start, start + batch_size))
            shape = (len(chunk), config.in_channels, config.image_size, config.image_size)
            outputs.append(sample(
                self.model, chunk.tokens, chunk.mask, chunk.pooled,
                self.null_text.tokens, self.null_text.mask, self.null_text.pooled,
                steps=steps, guidance_scale=guidance, generator=generator, shape=shape, solver=solver,
                autocast_dtype=autocast_dtype,
            ))
        return torch.cat(outputs).clamp(-1, 1)

    def __call__(self, prompts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """Images as [B,H,W,3] uint8 (see `generate_tensor` for the options)."""
        return to_uint8(self.generate_tensor(prompts, **kwargs))


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2, upscale: int = 2) -> np.ndarray:
    """Tile [B,H,W,3] uint8 images into one [H',W',3] grid (white gutters, nearest upscaling)."""
    count, height, width, channels = images.shape
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        height, width = height * upscale, width * upscale
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid
