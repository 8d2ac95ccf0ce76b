"""The registered MLflow pyfunc: a prompt in, a PNG out (MLflow "models from code").

Logged as code rather than a pickled object, so loading a registered model never unpickles
anything; the weights are the model directory's safetensors, and the generator's code
travels with the model (`code_paths`), so serving needs only the pip requirements.
Input: a DataFrame with a `prompt` column. Params: steps, guidance, seed, solver.
Output: a DataFrame with `image_png_base64`, `width`, `height` per prompt.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import pandas as pd


class TextToImagePyfunc(mlflow.pyfunc.PythonModel):
    """Wraps `models.generate.TextToImage` for MLflow (pyfunc.load_model, mlflow models serve)."""

    def load_context(self, context) -> None:
        """Load the safetensors weights and config from the `model_dir` artifact."""
        from models.generate import TextToImage

        self.generator = TextToImage.from_dir(context.artifacts["model_dir"])
        self.defaults = dict(self.generator.config.get("sampling", {}))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Generate one image per prompt; same prompt + seed -> same image."""
        from PIL import Image

        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].astype(str).tolist()
        else:
            prompts = [str(p) for p in model_input]
        options = {**self.defaults, **(params or {})}
        images = self.generator(prompts, steps=int(options.get("steps", 25)), guidance=float(options.get("guidance", 4.0)),
                                seed=int(options.get("seed", 0)), solver=str(options.get("solver", "euler")))
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        size = self.generator.image_size
        return pd.DataFrame({"image_png_base64": encoded, "width": size, "height": size})


mlflow.models.set_model(TextToImagePyfunc())
