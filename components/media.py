"""Shared media I/O: safe image decoding, normalisation, hashing and technical quality.

Every data-ingest and curation step goes through :func:`decode_image`, so a bad file
becomes a row in the manifest with a stable :class:`RejectReason` instead of a crashed
pipeline step. Nothing here imports kfp or mlflow: this module must stay importable
inside any container and from plain unit tests.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

__all__ = [
    "REASON_DESCRIPTIONS",
    "DecodePolicy",
    "DecodedImage",
    "RejectReason",
    "center_crop_resize",
    "check_geometry",
    "decode_image",
    "image_to_array",
    "image_to_png_bytes",
    "sha256_bytes",
    "sha256_file",
    "technical_quality",
]


class RejectReason(StrEnum):
    """Why an image was dropped.

    The values are written to Parquet manifests and shown in reports, so they are a
    storage format: never rename one, only add new ones.
    """

    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    DECOMPRESSION_BOMB = "decompression_bomb"
    FILE_TOO_LARGE = "file_too_large"
    TOO_SMALL = "too_small"
    ANIMATED = "animated"
    BAD_ASPECT_RATIO = "bad_aspect_ratio"
    EXACT_DUPLICATE = "exact_duplicate"
    LOW_QUALITY = "low_quality"
    NEAR_DUPLICATE = "near_duplicate"
    SEMANTIC_DUPLICATE = "semantic_duplicate"
    BLURRY = "blurry"
    BAD_EXPOSURE = "bad_exposure"
    POOR_PERCEPTUAL_QUALITY = "poor_perceptual_quality"
    TOO_MUCH_TEXT = "too_much_text"
    UNSAFE = "unsafe"
    LOW_ALIGNMENT = "low_alignment"
    LOW_AESTHETIC = "low_aesthetic"
    HUMAN_REJECTED = "human_rejected"
    NO_CAPTION = "no_caption"
    LOW_FPS = "low_fps"
    TOO_SHORT = "too_short"
    STATIC = "static"
    JITTERY = "jittery"


REASON_DESCRIPTIONS: Final[dict[RejectReason, str]] = {
    RejectReason.EMPTY_FILE: "The file is zero bytes long.",
    RejectReason.UNREADABLE: "The file could not be opened or is not a recognisable image.",
    RejectReason.UNSUPPORTED_FORMAT: (
        "The image format is not in the allow-list, or its pixel mode cannot be converted to RGB."
    ),
    RejectReason.TRUNCATED: "The image header is valid but decoding failed part-way (truncated or corrupt data).",
    RejectReason.DECOMPRESSION_BOMB: (
        "The header declares more pixels than the limit; rejected before decoding to bound memory."
    ),
    RejectReason.FILE_TOO_LARGE: "The file is larger than the byte limit.",
    RejectReason.TOO_SMALL: "The shorter side is below the minimum resolution.",
    RejectReason.ANIMATED: "The image has more than one frame and animated images are not allowed.",
    RejectReason.BAD_ASPECT_RATIO: "The width/height ratio is more extreme than allowed.",
    RejectReason.EXACT_DUPLICATE: "Byte-identical (same SHA-256) to an image already kept.",
    RejectReason.LOW_QUALITY: "Technical quality score (sharpness, colour, exposure) is below curate.filters.min_quality.",
    RejectReason.NEAR_DUPLICATE: "Perceptual hash within curate.dedup.max_hamming bits of a better-scored image kept.",
    RejectReason.SEMANTIC_DUPLICATE: "Embedding cosine at or above curate.dedup.semantic_threshold to an image kept (SemDeDup).",
    RejectReason.BLURRY: "Laplacian sharpness is below curate.filters.min_sharpness.",
    RejectReason.BAD_EXPOSURE: "More pixels than curate.filters.max_clipped are crushed black or blown white.",
    RejectReason.POOR_PERCEPTUAL_QUALITY: "BRISQUE score (lower is better) is above curate.filters.max_brisque.",
    RejectReason.TOO_MUCH_TEXT: "OCR-detected text covers more of the image than curate.filters.max_text_area.",
    RejectReason.UNSAFE: "The safety classifier's explicit-content score is above curate.filters.max_unsafe.",
    RejectReason.LOW_ALIGNMENT: "The caption matches the image's content less than curate.filters.min_alignment.",
    RejectReason.LOW_AESTHETIC: "Aesthetic score is below curate.filters.min_aesthetic.",
    RejectReason.HUMAN_REJECTED: "A reviewer labelled it reject (reelforge review import).",
    RejectReason.NO_CAPTION: "No usable caption and the tagger is off (curate.captions.tagger).",
    RejectReason.LOW_FPS: "The video's frame rate is below curate.video.min_fps.",
    RejectReason.TOO_SHORT: "The shot (between scene cuts) is shorter than curate.video.min_clip_seconds.",
    RejectReason.STATIC: "The clip moves less than curate.video.min_motion (a still picture as video).",
    RejectReason.JITTERY: "The clip's motion varies more than curate.video.max_jitter from frame to frame (shaky or flickering).",
}

# MPO is what Pillow calls a phone-camera JPEG that carries extra pictures (depth map,
# preview) after the main one. Those extra "frames" are not animation, and the primary
# picture is a plain JPEG, so for the allow-list it counts as JPEG.
_FORMAT_ALIASES: Final[dict[str, str]] = {"MPO": "JPEG"}

_EXIF_ORIENTATION: Final[int] = int(ExifTags.Base.Orientation)

# Modes whose last band is alpha and that must be composited over the background.
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class DecodePolicy:
    """What :func:`decode_image` accepts and how it repairs what it accepts.

    ``max_pixels`` is checked from the header, before any pixel data is decoded. Pillow
    keeps its own hard limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP by
    default) and this module does not change it, so a ``max_pixels`` above that is
    effectively capped there; such images are still reported as ``decompression_bomb``.
    """

    allowed_formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
    max_pixels: int = 40_000_000
    max_bytes: int = 50 * 1024 * 1024
    background: tuple[int, int, int] = (255, 255, 255)
    allow_animated: bool = False

    def __post_init__(self) -> None:
        # Pillow reports formats upper-case; accept {"png", "jpeg"} or a plain set from
        # a YAML recipe rather than silently rejecting everything.
        object.__setattr__(self, "allowed_formats", frozenset(f.upper() for f in self.allowed_formats))
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))
        if self.max_pixels <= 0 or self.max_bytes <= 0:
            raise ValueError("max_pixels and max_bytes must be positive")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple in 0..255, got {self.background}")


@dataclass
class DecodedImage:
    """The outcome of decoding one file; ``image`` is None when it was rejected.

    ``width``/``height``/``mode`` describe the file as stored (before EXIF rotation and
    RGB conversion) so rejected rows still carry them; ``image.size`` is the size after
    rotation. ``format`` is what the content actually is, whatever the file suffix says.
    ``repairs`` lists the normalisations applied to an accepted image.
    """

    image: Image.Image | None
    width: int
    height: int
    format: str | None
    mode: str | None
    reason: RejectReason | None
    detail: str
    repairs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the image was accepted and ``image`` holds RGB pixels."""
        return self.reason is None and self.image is not None


PathOrBytes = str | os.PathLike[str] | bytes | bytearray | memoryview

# Safe to share as a default argument: the dataclass is frozen.
_DEFAULT_POLICY: Final[DecodePolicy] = DecodePolicy()


def decode_image(path_or_bytes: PathOrBytes, policy: DecodePolicy = _DEFAULT_POLICY) -> DecodedImage:
    """Decode a file (path) or in-memory content (bytes) into an RGB image, safely.

    Never raises for bad input: every failure becomes a :class:`DecodedImage` with a
    :class:`RejectReason` and a ``detail`` naming the source. ``bytes`` are always
    treated as file content, never as a path.

    Memory is bounded by ``policy.max_bytes`` plus ``policy.max_pixels`` worth of
    pixels, because both limits are enforced before pixel data is decoded.
    Truncation detection relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` being False
    (Pillow's default); code that flips it globally disables the ``truncated`` reason.

    Warnings Pillow emits while decoding (e.g. corrupt EXIF) are captured into
    ``detail`` instead of being printed, so one noisy file does not flood the step log
    and ``-W error`` cannot turn a harmless warning into a rejection.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source = f"<{len(path_or_bytes)} bytes>"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        source = str(os.fspath(path_or_bytes))
    else:
        source = repr(path_or_bytes)
    try:
        # catch_warnings swaps process-wide filter state; decode in worker processes
        # rather than threads if the warning capture must be exact.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _decode(path_or_bytes, policy, source)
        messages = sorted({str(w.message) for w in caught})
        if messages:
            result.detail += " [warnings: " + "; ".join(messages) + "]"
        return result
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
        # Defensive net: every stage below maps its own errors; reaching this means a
        # bug or an exotic failure, and a reject row is still better than a crash.
        return _reject(RejectReason.UNREADABLE, source, f"unexpected {type(exc).__name__}: {exc}")


def _reject(
    reason: RejectReason,
    source: str,
    why: str,
    *,
    width: int = 0,
    height: int = 0,
    fmt: str | None = None,
    mode: str | None = None,
) -> DecodedImage:
    return DecodedImage(
        image=None,
        width=width,
        height=height,
        format=fmt,
        mode=mode,
        reason=reason,
        detail=f"{source}: {why}",
    )


def _decode(path_or_bytes: PathOrBytes, policy: DecodePolicy, source: str) -> DecodedImage:
    # Size checks first: they are a stat() away and keep huge files out of memory.
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        n_bytes = len(data)
        fp: str | io.BytesIO = io.BytesIO(data)
    else:
        try:
            n_bytes = os.stat(path_or_bytes).st_size
        except OSError as exc:
            return _reject(RejectReason.UNREADABLE, source, f"cannot stat file: {exc}")
        fp = os.fspath(path_or_bytes)
    if n_bytes == 0:
        return _reject(RejectReason.EMPTY_FILE, source, "file is empty")
    if n_bytes > policy.max_bytes:
        return _reject(
            RejectReason.FILE_TOO_LARGE, source, f"{n_bytes} bytes exceeds limit of {policy.max_bytes}"
        )

    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit fired while reading the header; nothing was decoded.
        return _reject(RejectReason.DECOMPRESSION_BOMB, source, str(exc))
    except MemoryError:
        return _reject(RejectReason.DECOMPRESSION_BOMB, source, "out of memory while reading the header")
    except Image.UnidentifiedImageError:
        # Pillow's message just repeats the file object's repr; say what it means.
        return _reject(RejectReason.UNREADABLE, source, "not a recognised image format")
    except Exception as exc:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, struct.error...
        return _reject(RejectReason.UNREADABLE, source, f"cannot identify image: {type(exc).__name__}: {exc}")

    with im:
        return _decode_opened(im, policy, source)


def _decode_opened(im: ImageFile.ImageFile, policy: DecodePolicy, source: str) -> DecodedImage:
    width, height = im.size
    fmt = im.format
    mode = im.mode
    meta = {"width": width, "height": height, "fmt": fmt, "mode": mode}

    canonical = _FORMAT_ALIASES.get(fmt or "", fmt)
    if canonical not in policy.allowed_formats:
        return _reject(RejectReason.UNSUPPORTED_FORMAT, source, f"format {fmt} is not allowed", **meta)
    if width * height > policy.max_pixels:
        return _reject(
            RejectReason.DECOMPRESSION_BOMB,
            source,
            f"{width}x{height} = {width * height} pixels exceeds limit of {policy.max_pixels}",
            **meta,
        )

    repairs: list[str] = []
    try:
        n_frames = int(getattr(im, "n_frames", 1))
    except Exception as exc:  # noqa: BLE001 - counting frames walks the file and can hit its end
        return _reject(RejectReason.TRUNCATED, source, f"cannot count frames: {type(exc).__name__}: {exc}", **meta)
    if n_frames > 1:
        if fmt in _FORMAT_ALIASES:
            repairs.append("primary_image_only")
        elif not policy.allow_animated:
            return _reject(RejectReason.ANIMATED, source, f"{n_frames} frames", **meta)
        else:
            repairs.append("first_frame_only")

    try:
        im.seek(0)
        im.load()
    except MemoryError:
        return _reject(RejectReason.DECOMPRESSION_BOMB, source, "out of memory while decoding", **meta)
    except Image.DecompressionBombError as exc:
        return _reject(RejectReason.DECOMPRESSION_BOMB, source, str(exc), **meta)
    except Exception as exc:  # noqa: BLE001 - OSError, zlib.error, SyntaxError, ValueError, EOFError...
        return _reject(RejectReason.TRUNCATED, source, f"decoding failed: {type(exc).__name__}: {exc}", **meta)

    img: Image.Image = im
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block should not cost us the pixels
        orientation = 1
        repairs.append("exif_ignored")
    if orientation in range(2, 9):
        try:
            img = ImageOps.exif_transpose(im)
            repairs.append("exif_transposed")
        except Exception:  # noqa: BLE001 - see above
            repairs.append("exif_ignored")

    try:
        rgb = _to_rgb(img, policy.background, repairs)
    except Exception as exc:  # noqa: BLE001 - exotic modes (LAB, HSV, CMYK;16...) Pillow cannot convert
        return _reject(
            RejectReason.UNSUPPORTED_FORMAT,
            source,
            f"cannot convert mode {img.mode} to RGB: {type(exc).__name__}: {exc}",
            **meta,
        )
    if rgb is im:
        # The result must not share state with the file object closed on return.
        rgb = im.copy()
    # Container metadata (ICC, EXIF, GIF palette info...) no longer describes these
    # pixels and would leak into anything saved from them.
    rgb.info = {}
    return DecodedImage(
        image=rgb,
        width=width,
        height=height,
        format=fmt,
        mode=mode,
        reason=None,
        detail=f"{source}: decoded {fmt} {mode} {width}x{height}",
        repairs=repairs,
    )


def _to_rgb(img: Image.Image, background: tuple[int, int, int], repairs: list[str]) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, appending repair labels."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        repairs.append("palette_to_rgb")
        if "transparency" in img.info:
            # Going through RGBA keeps the transparent index from turning into whatever
            # colour happens to sit in that palette slot (often black).
            return _flatten_alpha(img.convert("RGBA"), background, repairs)
        return img.convert("RGB")
    if mode in _ALPHA_MODES:
        if mode == "PA":
            repairs.append("palette_to_rgb")
        return _flatten_alpha(img.convert("RGBA"), background, repairs)
    if mode in ("L", "1"):
        # Lossless grey expansion; not worth a repair label.
        return img.convert("RGB")
    if mode == "CMYK":
        repairs.append("cmyk_to_rgb")
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _high_bit_depth_to_l(img, repairs)
        return grey.convert("RGB")
    # YCbCr, RGBX and friends have a direct Pillow conversion; LAB/HSV raise, and the
    # caller turns that into unsupported_format.
    repairs.append(f"{mode.lower()}_to_rgb")
    return img.convert("RGB")


def _flatten_alpha(rgba: Image.Image, background: tuple[int, int, int], repairs: list[str]) -> Image.Image:
    """Composite over ``background`` so transparent areas get a defined colour, not
    whatever garbage RGB the encoder left under alpha=0."""
    base = Image.new("RGBA", rgba.size, (*background, 255))
    base.alpha_composite(rgba)
    repairs.append("alpha_flattened")
    return base.convert("RGB")


def _high_bit_depth_to_l(img: Image.Image, repairs: list[str]) -> Image.Image:
    """Rescale 16/32-bit integer or float grey to 8 bits over its full range.

    ``convert("L")`` clips I;16 at 255, which turns almost every real 16-bit image
    white; scaling keeps mid-grey mid-grey.
    """
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        scaled = _scale_range(arr.astype(np.float64), 0.0, 65535.0)
        repairs.append("16bit_to_8bit")
    elif img.mode == "I":
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 65535:
            # Pillow (and TIFF/PNG writers) commonly carry 16-bit data in mode I.
            scaled = _scale_range(arr.astype(np.float64), 0.0, 65535.0)
            repairs.append("16bit_to_8bit")
        else:
            scaled = _scale_range(arr.astype(np.float64), lo, hi)
            repairs.append("32bit_to_8bit")
    else:  # "F"
        finite = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(finite.min()), float(finite.max())
        # Float images are conventionally [0, 1]; anything else gets its own range.
        scaled = _scale_range(finite, 0.0, 1.0) if lo >= 0 and hi <= 1 else _scale_range(finite, lo, hi)
        repairs.append("float_to_8bit")
    return Image.fromarray(scaled)


def _scale_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    if span <= 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / span)), 0, 255).astype(np.uint8)


def check_geometry(
    width: int, height: int, *, min_side: int = 0, max_aspect_ratio: float | None = None
) -> RejectReason | None:
    """Return ``too_small`` / ``bad_aspect_ratio`` for out-of-bounds dimensions, else None.

    ``max_aspect_ratio`` is long side over short side (e.g. 3.0 rejects panoramas wider
    than 3:1 either way). Pass the post-EXIF size (``DecodedImage.image.size``).
    """
    if min(width, height) < max(min_side, 1):
        return RejectReason.TOO_SMALL
    if max_aspect_ratio is not None and max(width, height) / min(width, height) > max_aspect_ratio:
        return RejectReason.BAD_ASPECT_RATIO
    return None


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (Lanczos) and center-crop to ``size`` x ``size``.

    Cropping and resizing happen in one ``resize(box=...)`` call, which is the same
    geometry as resize-then-crop but without a second rounding step. ``reducing_gap``
    lets Pillow first shrink big photos by an integer factor cheaply, which is several
    times faster and visually identical at a gap of 3.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ValueError(f"cannot resize an empty image ({w}x{h})")
    side = min(w, h)
    left = (w - side) / 2.0
    top = (h - side) / 2.0
    return image.resize(
        (size, size),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-sized pieces to bound memory."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_bytes(b: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of in-memory bytes (same value :func:`sha256_file` gives the file)."""
    return hashlib.sha256(b).hexdigest()


def image_to_png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG with no metadata, so equal pixels give equal bytes.

    Pillow's PNG writer copies ICC profiles and transparency from ``image.info``, so
    the info is dropped on a copy. Compression settings are pinned; the bytes are still
    only reproducible for a given Pillow/zlib build, so compare pixels across machines.
    """
    clean = image.copy()
    clean.info = {}
    buf = io.BytesIO()
    clean.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def image_to_array(image: Image.Image) -> np.ndarray:
    """Return a writable, C-contiguous ``uint8`` array of shape (H, W, 3)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.array(rgb, dtype=np.uint8, copy=True)


# Half-saturation points for squashing unbounded scores into [0, 1): a raw value equal
# to the constant maps to 0.5.
# 100 is the widely used "variance of Laplacian below 100 looks blurry" rule of thumb
# (on 0..255 grey, at a few hundred pixels per side).
SHARPNESS_HALF: Final[float] = 100.0
# 33 is "moderately colourful" on Hasler & Suesstrunk's perceptual scale.
COLORFULNESS_HALF: Final[float] = 33.0
# Luma at or beyond these 8-bit levels counts as clipped shadow/highlight.
_CLIP_LOW: Final[float] = 2.0
_CLIP_HIGH: Final[float] = 253.0


def technical_quality(image_rgb_array: np.ndarray) -> dict[str, float]:
    """Cheap technical-quality scores for an RGB ``uint8`` array of shape (H, W, 3).

    Scores are resolution dependent (sharpness especially), so compute them on images
    normalised to one size, e.g. after :func:`center_crop_resize` to 256 or 512, and
    pick thresholds on that size.

    - ``sharpness``: variance of the 4-neighbour Laplacian of the 0..255 luma. Unbounded;
      below ~100 usually looks blurry or is a flat graphic, several hundred is crisp,
      and very high values can also mean noise or text. Use as a floor, not a target.
    - ``colorfulness``: Hasler & Suesstrunk (2003) metric on 0..255 RGB. 0 is grey,
      ~15 slightly, ~33 moderately, ~59 quite, 80+ highly colourful. Filtering on it
      removes black-and-white photos too, so use a low floor if at all.
    - ``exposure``: in [0, 1]. ``1 - 2*|mean luma - 0.5|`` (1 = mid-grey average,
      0 = all black or all white) times ``1 - fraction of clipped pixels`` (luma <= 2 or
      >= 253). Around 0.5 and above is normally exposed; low values are very dark,
      very bright or heavily clipped frames. Intentional low/high-key shots score low.
    - ``quality``: in [0, 1), the mean of ``s/(s+100)`` for sharpness,
      ``c/(c+33)`` for colorfulness and ``exposure``. A coarse ranking signal for
      picking a quality-tuning subset (top-k or a percentile), not an aesthetic score.
    """
    arr = np.asarray(image_rgb_array)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {arr.shape}")

    rgb = arr.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Rec. 601 luma: the weights every "grey image" convention (PIL "L", OpenCV) uses,
    # so sharpness thresholds carry over from those tools.
    luma = 0.299 * r + 0.587 * g + 0.114 * b

    if luma.shape[0] >= 3 and luma.shape[1] >= 3:
        # Valid-region convolution only: padding would invent edges at the border.
        lap = (
            luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
        )
        sharpness = float(lap.var())
    else:
        sharpness = 0.0

    rg = r - g
    yb = 0.5 * (r + g) - b
    colorfulness = float(
        np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    )

    mean_luma = float(luma.mean()) / 255.0
    clipped = float(np.mean((luma <= _CLIP_LOW) | (luma >= _CLIP_HIGH)))
    exposure = float(np.clip((1.0 - abs(mean_luma - 0.5) * 2.0) * (1.0 - clipped), 0.0, 1.0))

    quality = (
        sharpness / (sharpness + SHARPNESS_HALF)
        + colorfulness / (colorfulness + COLORFULNESS_HALF)
        + exposure
    ) / 3.0
    return {
        "sharpness": sharpness,
        "colorfulness": colorfulness,
        "exposure": exposure,
        "quality": float(quality),
    }
