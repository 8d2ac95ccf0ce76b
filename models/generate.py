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
from models.flow import linear_quadratic_schedule, sample, uniform_schedule
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

    @property
    def distilled(self) -> bool:
        """True for a guidance-distilled student: one forward pass per step, guidance as an input."""
        return bool(self.model.config.guidance_embed)

    @property
    def default_steps(self) -> int:
        """Sampling steps the model directory recommends (a distilled student: its own few steps)."""
        return int((self.config.get("sampling") or {}).get("steps", 25))

    @property
    def default_guidance(self) -> float:
        """Guidance scale the model directory recommends."""
        return float((self.config.get("sampling") or {}).get("guidance", 4.0))

    def sampling_times(self, steps: int) -> torch.Tensor:
        """Sampling grid [steps+1] in 0..1.

        A progressively distilled student learned jumps between points of nested uniform grids
        (each round's grid is every other point of the previous one), so it samples on the
        uniform grid; a teacher uses Movie Gen's linear-quadratic schedule. (Nested
        linear-quadratic grids would spend half of a 4-step student's steps below t = 0.025.)
        """
        if self.distilled:
            return uniform_schedule(steps)
        return linear_quadratic_schedule(steps)

    @torch.inference_mode()
    def generate_tensor(
        self,
        prompts: Sequence[str] | TextEmbeddings,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | Sequence[int] = 0,
        solver: str = "euler",
        batch_size: int = 32,
        autocast_dtype: torch.dtype | None = None,
        frames: int = 1,
        height: int | None = None,
        width: int | None = None,
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1,1]: [B,C,H,W] images when frames == 1, else [B,C,T,H,W] clips.

        `steps`/`guidance` default to the model directory's sampling settings. `seed` is one seed
        for the batch, or one per prompt (each sample's noise then depends only on its own seed,
        so batching requests together does not change any of them). `negative_prompts` (one per
        prompt, "" = none) replace the empty caption as the unconditional branch of guidance.
        `frames`, `height`, `width` are pixel sizes (default: one frame at the trained image
        size); they must fit the latent space (1 + a multiple of the temporal downsampling,
        multiples of the spatial downsampling). Same prompts + seed -> same output.
        """
        embeddings = prompts if isinstance(prompts, TextEmbeddings) else self.text_encoder.encode(list(prompts))
        count = len(embeddings)
        steps = int(steps if steps is not None else self.default_steps)
        guidance = float(guidance if guidance is not None else self.default_guidance)
        if isinstance(seed, int):
            generators: list[torch.Generator] | None = None
            shared = torch.Generator().manual_seed(seed)
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != count:
                raise ValueError(f"{len(seeds)} seeds for {count} prompts")
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        negatives = None
        if negative_prompts is not None:
            if len(negative_prompts) != count:
                raise ValueError(f"{len(negative_prompts)} negative prompts for {count} prompts")
            if any(negative_prompts):
                negatives = self.text_encoder.encode([str(n) for n in negative_prompts])
        config = self.model.config
        height, width = height or self.image_size, width or self.image_size
        _, latent_frames, latent_height, latent_width = self.codec.latent_shape(frames, height, width)
        times = self.sampling_times(steps)
        outputs = []
        for start in range(0, count, batch_size):
            window = slice(start, start + batch_size)
            chunk = embeddings.select(window)
            if negatives is not None:
                null = negatives.select(window)
            elif self.distilled:
                null = None  # guidance is the student's input: one pass per step
            else:
                null = self.null_text
            shape = (len(chunk), config.in_channels, latent_frames, latent_height, latent_width)
            latents = sample(
                self.model, chunk.tokens, chunk.mask, chunk.pooled,
                *((null.tokens, null.mask, null.pooled) if null is not None else (None, None, None)),
                steps=steps, guidance_scale=guidance, shape=shape, solver=solver, times=times,
                generator=shared if generators is None else generators[window],
                autocast_dtype=autocast_dtype, guidance_input=self.distilled,
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
