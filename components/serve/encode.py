"""Generated frames -> the bytes of a media file, with the Content-Type that names it."""

from __future__ import annotations

import io

import numpy as np

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "gif": "image/gif", "mp4": "video/mp4"}


def encode_media(frames: np.ndarray, media_format: str, fps: float) -> bytes:
    """uint8 [T,H,W,3] frames -> `media_format` bytes.

    png holds one image (the first frame; the server only asks for it with one frame); webp and
    gif animate when there are several frames; mp4 is H.264 (a one-frame clip for an image).
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T,H,W,3], got {frames.dtype} {frames.shape}")
    if media_format == "mp4":
        from components.video import encode_mp4

        return encode_mp4(frames, fps)
    if media_format == "gif":
        from components.tracking import gif_bytes

        return gif_bytes(frames, fps)
    buffer = io.BytesIO()
    images = [Image.fromarray(frame) for frame in frames]
    if media_format == "png":
        images[0].save(buffer, format="PNG")
    elif media_format == "webp":
        images[0].save(buffer, format="WEBP", lossless=True, save_all=len(images) > 1, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
    else:
        raise ValueError(f"unknown media format {media_format!r} (one of {', '.join(CONTENT_TYPES)})")
    return buffer.getvalue()
