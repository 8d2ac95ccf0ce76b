"""Text-to-image and text-to-video inference from a model directory: prompts in, uint8 frames out.

A model directory is the Model artifact contract: `model.safetensors` (EMA weights of the
generator), `config.json` (architecture, latent space, text encoder, flow settings, the recipe),
`state.json`, and `autoencoder.safetensors` when the generator works in an autoencoder's latent
space (so one directory is everything serving needs). Evaluation, the MLflow pyfunc and the
inference server all sample through :class:`TextToImage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_model_dir, load_weights
from models.dit import DiT, DiTConfig
from models.flow import sample
from models.latent import PixelCodec, codec_from_dict
from models.text_encoder import TextEmbeddings, TextEncoder

AUTOENCODER_FILE = "autoencoder.safetensors"


def load_codec(directory: str | Path, config: dict[str, Any]) -> Any:
    """The latent codec a model directory's generator was trained with (pixel space when none is recorded)."""
    latent = config.get("latent")
    if not latent or latent.get("kind", "pixel") == "pixel":
        return PixelCodec()
    weights_path = Path(directory) / AUTOENCODER_FILE
    return codec_from_dict(latent, load_weights(weights_path))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] floats in [-1,1] -> [B,H,W,C] uint8; [B,C,T,H,W] -> [B,T,H,W,C]."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    order = (0, 2, 3, 1) if scaled.ndim == 4 else (0, 2, 3, 4, 1)
    return scaled.permute(*order).cpu().numpy()


class TextToImage:
    """A loaded generator with its text encoder; call it with prompts to get images."""

    def __init__(self, model: DiT, text_encoder: TextEncoder, config: dict[str, Any], state: dict[str, Any],
                 codec: Any = None) -> None:
        # Left in the caller's train/eval mode: during training this wraps the live EMA module
        # (the DiT has no dropout or norm statistics, so the mode does not change samples).
        self.model = model
        self.codec = codec if codec is not None else PixelCodec()
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
        encoder = text_encoder or TextEncoder(model_path=config["text"].get("model_path"),
                                              max_tokens=int(config["text"]["max_tokens"]))
        return cls(model, encoder, config, state, codec=load_codec(directory, config))

    @property
    def image_size(self) -> int:
        """Side of the square images this model makes by default, in pixels."""
        return int(self.model.config.image_size) * int(self.codec.spatial_downsample)

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
        frames: int = 1,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1,1]: [B,C,H,W] images when frames == 1, else [B,C,T,H,W] clips.

        `frames`, `height`, `width` are pixel sizes (default: one frame at the trained image
        size); they must fit the latent space (1 + a multiple of the temporal downsampling,
        multiples of the spatial downsampling). Same prompts + seed -> same output.
        """
        embeddings = prompts if isinstance(prompts, TextEmbeddings) else self.text_encoder.encode(list(prompts))
        generator = torch.Generator().manual_seed(seed)
        config = self.model.config
        height, width = height or self.image_size, width or self.image_size
        _, latent_frames, latent_height, latent_width = self.codec.latent_shape(frames, height, width)
        outputs = []
        for start in range(0, len(embeddings), batch_size):
            chunk = embeddings.select(slice(start, start + batch_size))
            shape = (len(chunk), config.in_channels, latent_frames, latent_height, latent_width)
            latents = sample(
                self.model, chunk.tokens, chunk.mask, chunk.pooled,
                self.null_text.tokens, self.null_text.mask, self.null_text.pooled,
                steps=steps, guidance_scale=guidance, generator=generator, shape=shape, solver=solver,
                autocast_dtype=autocast_dtype,
            )
            outputs.append(self.codec.decode(latents))  # [b, 3, T, H, W]
        pixels = torch.cat(outputs).clamp(-1, 1)
        return pixels[:, :, 0] if frames == 1 else pixels

    def __call__(self, prompts: Sequence[str], **kwargs: Any) -> np.ndarray:
        """[B,H,W,3] uint8 images, or [B,T,H,W,3] clips with frames > 1 (options: `generate_tensor`)."""
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
