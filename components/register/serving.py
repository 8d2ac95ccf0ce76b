"""The registered pyfunc's serving defaults and output formats, shared with the register stage.

Kept apart from `pyfunc_model.py` (which registers itself with MLflow when imported) so the
register stage builds the signature from the same defaults the model serves with. Encoding is
`components.serve.encode.encode_media` (one encoder for the pyfunc and the HTTP service). No
torch or MLflow at import time.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("png", "webp", "gif", "mp4")
AUTO_FORMAT = "auto"  # png for one frame, mp4 for clips
DEFAULT_FPS = 8.0  # playback rate of clips when the model directory records none


class MediaRequestError(ValueError):
    """A request the model cannot serve as asked (bad format for the frame count, unknown format)."""


def serving_defaults(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """Sampling defaults of a model directory: its config.json "sampling" (a distilled student: its
    own few steps), `image_size` (the trained size in pixels), one frame, format auto.

    Steps and guidance come from `models.generate.TextToImage`'s own properties, read on the
    config alone, so serving and the registered signature can never disagree with the generator.
    """
    from types import SimpleNamespace

    from models.generate import TextToImage

    view = SimpleNamespace(config=config)  # the two properties read nothing but .config
    sampling = config.get("sampling") or {}
    return {
        "steps": int(TextToImage.default_steps.fget(view)), "guidance": float(TextToImage.default_guidance.fget(view)),
        "seed": int(sampling.get("seed", 0)), "solver": str(sampling.get("solver", "euler")),
        "width": int(image_size), "height": int(image_size), "frames": 1, "format": AUTO_FORMAT,
    }


def clip_fps(config: dict[str, Any]) -> float:
    """Playback rate for clips: config.json "sampling"."fps" when recorded, else DEFAULT_FPS."""
    return float((config.get("sampling") or {}).get("fps", DEFAULT_FPS))


def resolve_format(media_format: str, frames: int) -> str:
    """`auto` -> png (one frame) or mp4 (clip); otherwise the lower-cased name, checked."""
    name = str(media_format).lower()
    if name == AUTO_FORMAT:
        return "png" if frames == 1 else "mp4"
    if name not in FORMATS:
        raise MediaRequestError(f"format must be one of {', '.join(FORMATS)} or {AUTO_FORMAT}, got {media_format!r}")
    if name == "png" and frames != 1:
        raise MediaRequestError(f"format png holds one image but {frames} frames were asked for; "
                                "use gif, webp or mp4")
    return name
