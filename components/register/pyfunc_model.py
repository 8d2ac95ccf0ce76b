"""The registered MLflow pyfunc: a prompt in, an image or a video out (MLflow "models from code").

Logged as code rather than a pickled object, so loading a registered model never unpickles
anything; the weights are the model directory's safetensors, read through
`models.checkpoint.load_weights` (which refuses pickle and zip payloads with CheckpointError),
and the generator's code travels with the model (`code_paths`: `models/` and the modules of
`components/` imported here), so serving needs only the pip requirements.

Input: a DataFrame with a `prompt` column and an optional `negative_prompt` column ("" = none).
Params (defaults: the model directory's config.json "sampling"; a distilled student samples
its own few steps with one forward pass per step): steps, guidance, seed, solver, width,
height, frames, format (png | webp | gif | mp4, or auto: png for one frame, mp4 for clips).
Row i is sampled with seed `seed + i`, so a row's output depends only on its prompt, its
negative prompt and its seed, not on the other rows.
Output: a DataFrame with `media_base64`, `format`, `width`, `height`, `frames` per prompt.
"""

from __future__ import annotations

import base64
import math

import mlflow.pyfunc
import pandas as pd

from components.register.serving import MediaRequestError, clip_fps, resolve_format, serving_defaults
from components.serve.encode import encode_media


def _invalid(message: str) -> Exception:
    """An error that `mlflow models serve` answers with 400 instead of 500."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


class TextToMediaPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps `models.generate.TextToImage` for MLflow (pyfunc.load_model, mlflow models serve)."""

    def load_context(self, context) -> None:
        """Load the safetensors weights and config from the `model_dir` artifact (pickle is refused)."""
        from models.generate import TextToImage

        self.generator = TextToImage.from_dir(context.artifacts["model_dir"])
        # The signature carries the same defaults (MLflow fills in missing params from it).
        self.defaults = serving_defaults(self.generator.config, self.generator.image_size)
        self.fps = clip_fps(self.generator.config)

    def _options(self, params: dict | None) -> dict:
        """Params merged over the defaults, type-checked, with a 400-class error naming the bad one."""
        options = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        try:
            for key in ("steps", "seed", "width", "height", "frames"):
                options[key] = int(options[key])
            options["guidance"] = float(options["guidance"])
        except (TypeError, ValueError) as error:
            raise _invalid(f"bad sampling parameter: {error}") from error
        for key in ("steps", "width", "height", "frames"):
            if options[key] < 1:
                raise _invalid(f"{key} must be at least 1, got {options[key]}")
        if not (math.isfinite(options["guidance"]) and options["guidance"] >= 0):
            raise _invalid(f"guidance must be a finite number >= 0, got {options['guidance']}")
        try:
            options["format"] = resolve_format(options["format"], options["frames"])
        except MediaRequestError as error:
            raise _invalid(str(error)) from error
        # Sizes the latent space and the transformer's patches can represent.
        codec, config = self.generator.codec, self.generator.model.config
        cell = int(codec.spatial_downsample) * int(config.patch_size)
        for key in ("width", "height"):
            if options[key] % cell:
                raise _invalid(f"{key} {options[key]} must be a multiple of {cell} for this model")
        step_t = int(codec.temporal_downsample)
        if (options["frames"] - 1) % step_t or ((options["frames"] - 1) // step_t + 1) % int(config.patch_size_t):
            raise _invalid(f"frames {options['frames']} does not fit this model's latent frames "
                           f"(1 + a multiple of {step_t}, in groups of {config.patch_size_t})")
        return options

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Generate one image or clip per prompt; same prompt + negative prompt + seed -> same output."""
        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise _invalid(f"input needs a 'prompt' column, got columns {list(model_input.columns)}")
            prompts = model_input["prompt"].astype(str).tolist()
            negatives = (model_input["negative_prompt"].fillna("").astype(str).tolist()
                         if "negative_prompt" in model_input.columns else None)
        else:
            prompts, negatives = [str(p) for p in model_input], None
        options = self._options(params)
        media = self.generator(
            prompts, steps=options["steps"], guidance=options["guidance"],
            seed=[options["seed"] + index for index in range(len(prompts))], solver=options["solver"],
            frames=options["frames"], height=options["height"], width=options["width"],
            negative_prompts=negatives if negatives and any(negatives) else None,
        )  # [B,H,W,3] images or [B,T,H,W,3] clips, uint8
        if media.ndim == 4:
            media = media[:, None]
        encoded = [base64.b64encode(encode_media(clip, options["format"], self.fps)).decode("ascii") for clip in media]
        count = len(encoded)
        return pd.DataFrame({
            "media_base64": encoded, "format": [options["format"]] * count,
            "width": [int(media.shape[3])] * count, "height": [int(media.shape[2])] * count,
            "frames": [int(media.shape[1])] * count,
        })


mlflow.models.set_model(TextToMediaPyfunc())
