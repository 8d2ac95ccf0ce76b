"""Per-sample content scorers that curation runs on batches of decoded images.

Each :class:`Scorer` turns a :class:`ScoreBatch` (ids, RGB "analysis copies" whose shorter side
is at most ``curate.analysis_side``, cleaned captions) into float manifest columns, one value
per image. :func:`build_scorers` picks the scorers a recipe names, in dependency order;
:func:`score_batch` runs them, handing each one what the earlier ones returned (the
"features" scorer's embeddings feed the aesthetic scorer).

| scorer      | columns (float)                                                   | model (offline, in a wheel)       |
|-------------|-------------------------------------------------------------------|-----------------------------------|
| technical   | quality, sharpness, colorfulness, brightness, clipped, background | none (numpy + OpenCV)             |
| brisque     | brisque                                                           | ``brisque`` SVR                   |
| ocr         | text_area, text_boxes                                             | RapidOCR PP-OCRv4 text detector   |
| safety      | unsafe                                                            | NudeNet 320n detector             |
| features    | alignment (+ extra keys features, tags, class_probs)              | EfficientNet-Lite0 + MiniLM       |
| aesthetic   | aesthetic                                                         | ``components.curate.aesthetic``   |

Models are loaded once per process, lazily, into a module-level cache (:func:`_cached`), on
CPU, and never per batch. ONNX Runtime sessions use ``torch.get_num_threads()`` intra-op
threads, so a curation worker that sets torch to one thread gets single-threaded scorers.

Odd but valid images (1 pixel tall, 8x8, all one colour) never raise: each scorer documents
the value it returns for them (a defined number, or NaN where the score does not exist).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, TypeVar

import cv2
import numpy as np

from components.config import CurateConfig
from components.media import COLORFULNESS_HALF, SHARPNESS_HALF

__all__ = [
    "EXPLICIT_CLASSES",
    "SCORER_ORDER",
    "SCORE_COLUMNS",
    "AestheticScorer",
    "BrisqueScorer",
    "FeaturesScorer",
    "OcrScorer",
    "SafetyScorer",
    "ScoreBatch",
    "Scorer",
    "TechnicalScorer",
    "background_mask",
    "build_scorers",
    "embed_texts",
    "imagenet_class_names",
    "score_batch",
    "technical_scores",
]

SCORE_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "technical": ("quality", "sharpness", "colorfulness", "brightness", "clipped", "background"),
    "brisque": ("brisque",),
    "ocr": ("text_area", "text_boxes"),
    "safety": ("unsafe",),
    "features": ("alignment",),
    "aesthetic": ("aesthetic",),
}
# Dependency-safe run order: "aesthetic" reads context["features"].
SCORER_ORDER: Final[tuple[str, ...]] = ("technical", "brisque", "ocr", "safety", "features", "aesthetic")

ScoreOutput = dict[str, Any]


@dataclass
class ScoreBatch:
    """One batch of samples to score: parallel lists, one entry per sample.

    ``images`` are RGB ``uint8`` ``(H, W, 3)`` arrays (sizes may differ), ``captions`` the
    cleaned captions (None = missing).
    """

    ids: list[str]
    images: list[np.ndarray]
    captions: list[str | None]

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.images) == len(self.captions):
            raise ValueError(
                f"ScoreBatch: ids ({len(self.ids)}), images ({len(self.images)}) and captions "
                f"({len(self.captions)}) must have the same length"
            )
        for sample_id, image in zip(self.ids, self.images, strict=True):
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                raise ValueError(f"ScoreBatch: image of sample {sample_id!r} must be uint8 (H, W, 3) RGB, got {got}")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"ScoreBatch: image of sample {sample_id!r} is empty ({image.shape})")

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.ids)


class Scorer(ABC):
    """A batch scorer: ``score`` returns ``{column: float array (N,)}`` for every name in ``columns``."""

    name: str
    columns: tuple[str, ...]

    def __init__(self, config: CurateConfig) -> None:
        """Keep the curation config; models load lazily on the first batch."""
        self.config = config

    @abstractmethod
    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """Score a batch; ``context`` holds what earlier scorers returned for it."""

    def _empty(self) -> ScoreOutput:
        """The output for an empty batch: zero-length columns."""
        return {column: np.zeros(0, dtype=np.float64) for column in self.columns}


# ---------------------------------------------------------------------------------------------
# Per-process model cache
# ---------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.RLock()  # re-entrant: one factory may use another cached model


def _cached(key: str, factory: Callable[[], _T]) -> _T:
    """The process-wide instance for ``key``, built by ``factory`` on first use only."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = factory()
        return _MODELS[key]


def _onnx_threads() -> int:
    """Intra-op threads for ONNX Runtime: follow torch's setting so one knob sizes every scorer."""
    import torch

    return max(1, int(torch.get_num_threads()))


def _onnx_session(model_path: str) -> Any:
    """A CPU ONNX Runtime session with the process's thread budget (quiet logs)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _onnx_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# technical: sharpness, colour, exposure measured on the picture's content
# ---------------------------------------------------------------------------------------------

# Luma at or beyond these 8-bit levels is crushed black / blown white (as components.media).
_CLIP_LOW: Final[float] = 2.0
_CLIP_HIGH: Final[float] = 253.0
# A uniform background: at least this share of the border is one colour (each channel within
# the tolerance, which absorbs resampling and light JPEG noise) ...
_BACKGROUND_BORDER_SHARE: Final[float] = 0.5
_BACKGROUND_TOLERANCE: Final[int] = 8
# ... and the content left after removing it must have at least this many pixels to be measured.
_MIN_CONTENT_PIXELS: Final[int] = 16


def background_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of a uniform backdrop: one colour that fills most of the border and is connected to it.

    Clip-art and product shots (Tux Paint stamps are PNG cut-outs composited over white) sit
    on a flat backdrop. Its pixels say nothing about the picture's exposure or sharpness, and
    a white one is "blown" by the luma test, so :func:`technical_scores` measures the content
    without it. The backdrop is the colour of the most common border pixel, if at least half
    the border is within ±8 levels of it, and only the regions of that colour touching the
    border count (white *inside* the subject stays content). Photos rarely have such a border;
    one whose border is mostly blown-out sky gets that sky treated as backdrop.

    Returns a bool ``(H, W)`` mask (all False when there is no uniform backdrop).
    """
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    if h < 3 or w < 3:
        return mask
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).astype(np.int32)
    packed = (border[:, 0] << 16) | (border[:, 1] << 8) | border[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    mode = int(values[np.argmax(counts)])
    colour = np.array([(mode >> 16) & 255, (mode >> 8) & 255, mode & 255], dtype=np.int16)
    near_border = np.abs(border - colour).max(axis=1) <= _BACKGROUND_TOLERANCE
    if near_border.mean() < _BACKGROUND_BORDER_SHARE:
        return mask
    near = (np.abs(rgb.astype(np.int16) - colour).max(axis=2) <= _BACKGROUND_TOLERANCE).astype(np.uint8)
    _, labels = cv2.connectedComponents(near, connectivity=4)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge_labels = edge_labels[edge_labels > 0]  # label 0 is "not backdrop colour"
    return np.isin(labels, edge_labels)


def technical_scores(rgb: np.ndarray) -> dict[str, float]:
    """Technical quality of one RGB ``uint8`` image, measured on its content (backdrop excluded).

    The formulas are :func:`components.media.technical_quality`'s, restricted to the pixels
    that are not a uniform backdrop (:func:`background_mask`); for an image without one the
    raw numbers equal that function's exactly. All values are in [0, 1]:

    - ``sharpness``: ``v / (v + 100)`` where ``v`` is the variance of the 4-neighbour
      Laplacian of 0..255 luma over the content and a 1-pixel ring around it (so the
      subject's outline counts). 0.5 = the classic "variance 100 looks blurry" line.
      Resolution dependent: compare images at the same analysis size. 0 below 3x3 pixels.
    - ``colorfulness``: ``c / (c + 33)`` for Hasler & Suesstrunk's metric ``c`` (0 = grey;
      33 "moderately colourful" maps to 0.5). Invert with ``c = 33 x / (1 - x)``.
    - ``brightness``: mean Rec. 601 luma of the content / 255.
    - ``clipped``: share of content pixels with luma <= 2 or >= 253 (crushed / blown).
    - ``quality``: mean of sharpness, colorfulness and exposure, where exposure is
      ``(1 - 2|brightness - 0.5|) (1 - clipped)``; a coarse ranking signal.
    - ``background``: share of the image that is uniform backdrop (0 for most photos).

    An image that is all backdrop (or whose content has fewer than 16 pixels, e.g. a blank
    white page) is measured as a whole: an all-white image has ``clipped`` 1, brightness 1.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    backdrop = background_mask(arr)
    content = ~backdrop
    if int(content.sum()) < _MIN_CONTENT_PIXELS:
        content = np.ones_like(content)
    whole = bool(content.all())

    pixels = arr.astype(np.float64)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b

    if luma.shape[0] >= 3 and luma.shape[1] >= 3:
        lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
        if not whole:
            ring = cv2.dilate(content.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            lap = lap[ring[1:-1, 1:-1]]
        sharpness_raw = float(lap.var()) if lap.size else 0.0
    else:
        sharpness_raw = 0.0

    if not whole:
        r, g, b, luma = r[content], g[content], b[content], luma[content]
    rg = r - g
    yb = 0.5 * (r + g) - b
    colorfulness_raw = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    brightness = float(luma.mean()) / 255.0
    clipped = float(np.mean((luma <= _CLIP_LOW) | (luma >= _CLIP_HIGH)))
    exposure = float(np.clip((1.0 - abs(brightness - 0.5) * 2.0) * (1.0 - clipped), 0.0, 1.0))
    sharpness = sharpness_raw / (sharpness_raw + SHARPNESS_HALF)
    colorfulness = colorfulness_raw / (colorfulness_raw + COLORFULNESS_HALF)
    return {
        "quality": (sharpness + colorfulness + exposure) / 3.0,
        "sharpness": sharpness,
        "colorfulness": colorfulness,
        "brightness": brightness,
        "clipped": clipped,
        "background": float(backdrop.mean()),
    }


class TechnicalScorer(Scorer):
    """Sharpness, colour and exposure on the content of each image (see :func:`technical_scores`)."""

    name = "technical"
    columns = SCORE_COLUMNS["technical"]

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """Pure numpy/OpenCV, no model; defined for every non-empty image."""
        if not len(batch):
            return self._empty()
        rows = [technical_scores(image) for image in batch.images]
        return {column: np.array([row[column] for row in rows], dtype=np.float64) for column in self.columns}


# ---------------------------------------------------------------------------------------------
# brisque: no-reference perceptual quality (lower is better)
# ---------------------------------------------------------------------------------------------

# Below this shorter side the half-scale pass has too few pixels for the distribution fits.
BRISQUE_MIN_SIDE: Final[int] = 16


def _brisque_model() -> Any:
    """The ``brisque`` package's model, subclassed to work on numpy 2 without patching it.

    brisque 0.2.0 builds its 36 features as an object array mixing scalars and 1-element
    arrays, which its ``scale_features`` turns into floats with ``float(f)``; numpy 2 refuses
    that for 1-d arrays (``TypeError: only 0-dimensional arrays can be converted``). The
    subclass computes the same features with the package's own functions and flattens them
    itself; the SVR and scaling parameters are the package's.
    """
    from brisque import BRISQUE

    class Brisque(BRISQUE):  # type: ignore[misc] - untyped third-party base
        def features(self, rgb: np.ndarray) -> np.ndarray:
            """The 36 BRISQUE features (18 at full and 18 at half scale) as float64."""
            # skimage's rgb2gray (what the package uses) is a BLAS matrix product, whose last
            # bits vary with the thread split; the same sum elementwise is reproducible.
            pixels = rgb.astype(np.float64) / 255.0
            gray = 0.2125 * pixels[..., 0] + 0.7154 * pixels[..., 1] + 0.0721 * pixels[..., 2]
            full = self.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6)
            half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
            coarse = self.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)
            return np.array([float(np.ravel(value)[0]) for value in (*full, *coarse)], dtype=np.float64)

        def score_rgb(self, rgb: np.ndarray) -> float:
            """BRISQUE score of an RGB uint8 image, or NaN where it is undefined (see BrisqueScorer)."""
            if min(rgb.shape[:2]) < BRISQUE_MIN_SIDE:
                return math.nan
            with np.errstate(all="ignore"):
                features = self.features(rgb)
            if not np.all(np.isfinite(features)):
                return math.nan
            # The package's own scaling (to [-1, 1] with its training min/max) and SVR predict.
            return float(self.calculate_image_quality_score(features))

    return Brisque(url=False)


class BrisqueScorer(Scorer):
    """BRISQUE (Mittal et al. 2012) from the ``brisque`` package: lower is better, about 0-100.

    NaN where BRISQUE is undefined: the shorter side is below 16 pixels, or the image has no
    texture at all (a flat colour: the distribution fits divide by zero). Deterministic.
    """

    name = "brisque"
    columns = SCORE_COLUMNS["brisque"]

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """One SVR prediction per image (the package has no batch API; ~90 img/s at 224 px)."""
        if not len(batch):
            return self._empty()
        model = _cached("brisque", _brisque_model)
        return {"brisque": np.array([model.score_rgb(image) for image in batch.images], dtype=np.float64)}


# ---------------------------------------------------------------------------------------------
# ocr: share of the image covered by text
# ---------------------------------------------------------------------------------------------

# The detector sees each image with its shorter side scaled to this. RapidOCR's default, 736,
# is ~20x slower on analysis copies; at 224 it still finds 10 px text on a 224 px image, and
# upscaling further mostly adds false positives on clip-art (measured on the Tux Paint stamps).
OCR_SIDE: Final[int] = 224
# Minimum mean text probability inside a box (RapidOCR: 0.5). 0.7 keeps rendered text down to
# 10 px and drops about a quarter of the boxes the detector finds in text-free clip-art.
OCR_BOX_THRESHOLD: Final[float] = 0.7
# Longer sides are capped at this multiple of OCR_SIDE, so a 1 x 500 sliver is not blown up.
_OCR_MAX_ASPECT: Final[int] = 8
# Below this shorter side no readable text fits: text_area = 0, text_boxes = 0.
OCR_MIN_SIDE: Final[int] = 8


def _text_detector() -> Any:
    """RapidOCR's PP-OCRv4 text *detector* only: recognition and angle models are never loaded."""
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import read_yaml, update_model_path

    config = dict(update_model_path(read_yaml(str(DEFAULT_CFG_PATH)))["Det"])
    config.update(limit_side_len=OCR_SIDE, limit_type="min", box_thresh=OCR_BOX_THRESHOLD)
    detector = TextDetector(config)
    # Replace the package's session (all cores, arena on) with one sized like the others.
    detector.infer.session = _onnx_session(str(config["model_path"]))
    return detector


class OcrScorer(Scorer):
    """Text in the image (Emu/Movie Gen drop text-heavy images): RapidOCR's detector, no recognition.

    ``text_area`` is the share of the image inside the union of the detected text boxes (0..1);
    ``text_boxes`` counts the boxes. Images under 8 pixels on the shorter side get 0 and 0.
    """

    name = "ocr"
    columns = SCORE_COLUMNS["ocr"]

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """Detection runs one image at a time: the detector's input size follows each image."""
        if not len(batch):
            return self._empty()
        detector = _cached("ocr", _text_detector)
        area = np.zeros(len(batch), dtype=np.float64)
        boxes = np.zeros(len(batch), dtype=np.float64)
        for i, image in enumerate(batch.images):
            area[i], boxes[i] = _text_coverage(detector, image)
        return {"text_area": area, "text_boxes": boxes}


def _text_coverage(detector: Any, rgb: np.ndarray) -> tuple[float, int]:
    """(share of the image inside text boxes, number of boxes) for one image."""
    h, w = rgb.shape[:2]
    if min(h, w) < OCR_MIN_SIDE:
        return 0.0, 0
    scale = OCR_SIDE / min(h, w)
    size = (min(round(w * scale), OCR_SIDE * _OCR_MAX_ASPECT), min(round(h * scale), OCR_SIDE * _OCR_MAX_ASPECT))
    resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    bgr = np.ascontiguousarray(resized[..., ::-1])  # PaddleOCR models are trained on BGR
    found, _ = detector(bgr)
    if found is None or len(found) == 0:
        return 0.0, 0
    covered = np.zeros(bgr.shape[:2], dtype=np.uint8)
    cv2.fillPoly(covered, [np.round(box).astype(np.int32) for box in found], 1)
    return float(covered.mean()), len(found)


# ---------------------------------------------------------------------------------------------
# safety: explicit nudity
# ---------------------------------------------------------------------------------------------

# NudeNet 3.4 labels that count as explicit. Deliberately not: MALE_BREAST_EXPOSED, BELLY,
# ARMPITS and FEET (exposed or covered), faces, and every *_COVERED class (swimwear, underwear).
EXPLICIT_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)


def _nude_detector() -> Any:
    """NudeNet's detector with a session sized like the other scorers' (same ONNX model file)."""
    from pathlib import Path

    import nudenet

    detector = nudenet.NudeDetector()
    detector.onnx_session = _onnx_session(str(Path(nudenet.__file__).with_name("320n.onnx")))
    return detector


class SafetyScorer(Scorer):
    """``unsafe``: the highest NudeNet detection score over :data:`EXPLICIT_CLASSES`, 0 when none.

    NudeNet only reports detections scoring at least 0.2, so values are 0 or in [0.2, 1].
    Every image (padded to a square, resized to 320) gets a defined value, tiny ones included.
    """

    name = "safety"
    columns = SCORE_COLUMNS["safety"]

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """One batched ONNX forward pass per batch."""
        if not len(batch):
            return self._empty()
        detector = _cached("safety", _nude_detector)
        # NudeNet's reader converts with COLOR_RGBA2BGR and then swaps back to RGB for the
        # network, so it expects RGBA arrays: add an opaque alpha channel.
        rgba = [np.dstack([image, np.full(image.shape[:2], 255, dtype=np.uint8)]) for image in batch.images]
        detections = detector.detect_batch(rgba, batch_size=len(rgba))
        unsafe = [
            max((d["score"] for d in found if d["class"] in EXPLICIT_CLASSES), default=0.0) for found in detections
        ]
        return {"unsafe": np.array(unsafe, dtype=np.float64)}


# ---------------------------------------------------------------------------------------------
# features: EfficientNet-Lite0 embeddings, ImageNet tags and caption alignment
# ---------------------------------------------------------------------------------------------

# EfficientNet input side for curation (as the evaluation stage's feature_resolution). On one
# core of the project's CPU, Tux Paint analysis copies: 128 px ~105 img/s, 160 ~52, 224 ~23;
# caption alignment separates matched from shuffled captions about as well at 128 (retrieval
# AUC 0.67) as at 224 (0.69), and 800 images take ~4 s on 2 cores instead of ~17 s.
FEATURE_SIDE: Final[int] = 128
# Caption tokens for the alignment embedding (cleaned captions are at most ~60 words).
_ALIGNMENT_TOKENS: Final[int] = 64
# Alignment compares the caption with this many most probable ImageNet labels (renormalised).
ALIGNMENT_TOP_K: Final[int] = 20
# Texts per MiniLM forward pass when embedding captions and class names.
_TEXT_BATCH: Final[int] = 64


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in EfficientNet-Lite0's logit order, as readable words."""

    def load() -> tuple[str, ...]:
        text = resources.files("components.curate").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
        names = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        if len(names) != 1000:
            raise RuntimeError(f"components/curate/imagenet_classes.txt has {len(names)} names, expected 1000")
        return names

    return _cached("imagenet_class_names", load)


def _feature_extractor() -> Any:
    from models.vision_features import ImageFeatureExtractor

    return ImageFeatureExtractor(input_size=FEATURE_SIDE, class_names=imagenet_class_names())


def _text_encoder() -> Any:
    from models.text_encoder import TextEncoder

    return TextEncoder(max_tokens=_ALIGNMENT_TOKENS)


def embed_texts(texts: list[str]) -> np.ndarray:
    """MiniLM sentence embeddings ``(N, 384)`` float64, L2-normalised, at most 64 tokens each.

    The same pooling as :meth:`models.text_encoder.TextEncoder.encode` (masked mean, then L2),
    but padded to the longest text of each length-sorted chunk rather than to a fixed length:
    short captions and class names cost a fraction (the 1000 class names: ~24 s padded to 64
    tokens on one core, ~2 s like this). Results match ``encode(...).pooled`` to float
    round-off because padded positions are masked out of attention and of the mean.
    """
    import torch

    encoder = _cached("text_encoder", _text_encoder)
    out = np.zeros((len(texts), encoder.dim), dtype=np.float64)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), _TEXT_BATCH):
            chunk = order[start : start + _TEXT_BATCH]
            tokens = encoder.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=_ALIGNMENT_TOKENS, return_tensors="pt"
            ).to(encoder.device)
            hidden = encoder.model(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[chunk] = torch.nn.functional.normalize(mean, dim=-1).double().cpu().numpy()
    return out


def _class_name_embeddings() -> np.ndarray:
    """MiniLM embeddings (1000, 384) of the ImageNet class names, L2-normalised, once per process."""
    return embed_texts(list(imagenet_class_names()))


class FeaturesScorer(Scorer):
    """EfficientNet-Lite0 embeddings and labels, and the caption's agreement with them.

    Returns, besides the ``alignment`` column:

    - ``features``: ``(N, 1280)`` float32, the raw pooled penultimate activations (not
      normalised; semantic dedup and balancing normalise themselves). Computed at
      :data:`FEATURE_SIDE` = 128 px: each analysis copy is squashed to 128x128 (no crop),
      like the evaluation stage's features; ImageNet's 224 costs ~4.5x the time.
    - ``class_probs``: ``(N, 1000)`` float32 ImageNet softmax probabilities.
    - ``tags``: ``N`` lists of the ``curate.captions.tagger_labels`` most probable class
      names, most probable first, duplicates ("crane" the bird and the machine) merged.

    ``alignment`` (0..1, NaN where the caption is None): no CLIP is available offline, so the
    image is described by its ImageNet labels. The caption's MiniLM embedding ``c`` is compared
    with ``t``, the probability-weighted mean of the embeddings of the label names over the
    image's 20 most probable labels (probabilities renormalised over those 20):
    ``alignment = clip(cos(c, t), 0, 1)``. MiniLM cosines of unrelated text are about 0-0.15
    and of related text 0.3-0.8, so negative cosines carry no extra information and clip to 0.
    ImageNet has no labels for many things (people, scenes, drawings as such), so treat it as
    a coarse signal. On Tux Paint stamps, captions score ~0.33 on their own image and ~0.22 on
    a random one (a caption beats a random one for its image 2 times in 3): a filter threshold
    around 0.1-0.15 catches only captions about something else entirely.
    """

    name = "features"
    columns = SCORE_COLUMNS["features"]

    def _empty(self) -> ScoreOutput:
        return {
            "alignment": np.zeros(0, dtype=np.float64),
            "features": np.zeros((0, 1280), dtype=np.float32),
            "class_probs": np.zeros((0, 1000), dtype=np.float32),
            "tags": [],
        }

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """One batched forward pass for the images and one for the captions present."""
        import torch

        if not len(batch):
            return self._empty()
        extractor = _cached("features", _feature_extractor)
        squares = np.stack([_squash(image, FEATURE_SIDE) for image in batch.images])
        pixels = torch.from_numpy(squares).permute(0, 3, 1, 2)
        features, logits = extractor.features_and_logits(pixels, batch_size=max(1, len(batch)))
        probs = torch.softmax(logits.double(), dim=1).numpy()

        names = imagenet_class_names()
        order = np.argsort(-probs, axis=1, kind="stable")
        tags = [_top_names(row, names, self.config.captions.tagger_labels) for row in order]

        alignment = np.full(len(batch), np.nan, dtype=np.float64)
        present = [i for i, caption in enumerate(batch.captions) if caption is not None and caption.strip()]
        if present:
            labels = _cached("class_name_embeddings", _class_name_embeddings)
            captions = embed_texts([str(batch.captions[i]) for i in present])
            top = order[present, :ALIGNMENT_TOP_K]
            weights = np.take_along_axis(probs[present], top, axis=1)
            weights /= weights.sum(axis=1, keepdims=True)
            image_text = np.einsum("nk,nkd->nd", weights, labels[top])
            image_text /= np.maximum(np.linalg.norm(image_text, axis=1, keepdims=True), 1e-12)
            alignment[present] = np.clip(np.einsum("nd,nd->n", captions, image_text), 0.0, 1.0)
        return {
            "alignment": alignment,
            "features": features.numpy().astype(np.float32),
            "class_probs": probs.astype(np.float32),
            "tags": tags,
        }


def _squash(rgb: np.ndarray, side: int) -> np.ndarray:
    """Resize to ``side x side`` without cropping (as ImageFeatureExtractor does), area-averaged when shrinking."""
    h, w = rgb.shape[:2]
    if (h, w) == (side, side):
        return rgb
    interpolation = cv2.INTER_AREA if h >= side and w >= side else cv2.INTER_LINEAR
    return cv2.resize(rgb, (side, side), interpolation=interpolation)


def _top_names(ranked: np.ndarray, names: tuple[str, ...], count: int) -> list[str]:
    """The first ``count`` distinct names in ranked class order."""
    out: list[str] = []
    for index in ranked:
        name = names[int(index)]
        if name not in out:
            out.append(name)
            if len(out) == count:
                break
    return out


# ---------------------------------------------------------------------------------------------
# aesthetic: adapter over components.curate.aesthetic
# ---------------------------------------------------------------------------------------------


class AestheticScorer(Scorer):
    """``aesthetic`` (0..1) from ``components.curate.aesthetic`` on the images and their features.

    Needs the "features" scorer earlier in the same run (``context["features"]``).
    """

    name = "aesthetic"
    columns = SCORE_COLUMNS["aesthetic"]

    def score(self, batch: ScoreBatch, context: dict[str, Any]) -> ScoreOutput:
        """Delegate to the configured aesthetic scorer (loaded once per process and config)."""
        if not len(batch):
            return self._empty()
        if "features" not in context:
            raise RuntimeError("the 'aesthetic' scorer needs the 'features' scorer to run first in the same batch")
        from components.curate import aesthetic

        key = "aesthetic:" + self.config.aesthetic.model_dump_json()
        model = _cached(key, lambda: aesthetic.load_aesthetic_scorer(self.config.aesthetic))
        values = np.asarray(model.score(batch.images, context["features"]), dtype=np.float64).reshape(-1)
        return {"aesthetic": values}


# ---------------------------------------------------------------------------------------------
# Building and running
# ---------------------------------------------------------------------------------------------

_SCORER_TYPES: Final[dict[str, type[Scorer]]] = {
    cls.name: cls
    for cls in (TechnicalScorer, BrisqueScorer, OcrScorer, SafetyScorer, FeaturesScorer, AestheticScorer)
}


def build_scorers(config: CurateConfig) -> list[Scorer]:
    """The scorers named in ``config.scorers``, in a dependency-safe order (features before aesthetic).

    Building is cheap: each scorer loads its model on its first batch, once per process.
    """
    wanted = set(config.scorers)
    unknown = sorted(wanted - set(_SCORER_TYPES))
    if unknown:
        raise ValueError(f"curate.scorers: unknown scorer(s) {unknown}; known: {list(SCORER_ORDER)}")
    if "aesthetic" in wanted and "features" not in wanted:
        raise ValueError("curate.scorers: 'aesthetic' needs 'features' (it scores the image embeddings)")
    return [_SCORER_TYPES[name](config) for name in SCORER_ORDER if name in wanted]


def score_batch(scorers: list[Scorer], batch: ScoreBatch) -> ScoreOutput:
    """Run the scorers in order on one batch, passing what each returns on to the next.

    Returns the merged dict: every scorer's columns as float64 arrays ``(N,)`` plus the
    extra keys ("features", "class_probs", "tags" from the features scorer).
    """
    context: ScoreOutput = {}
    n = len(batch)
    for scorer in scorers:
        out = scorer.score(batch, context)
        for column in scorer.columns:
            if column not in out:
                raise RuntimeError(f"scorer {scorer.name!r} did not return its column {column!r}")
            values = np.asarray(out[column], dtype=np.float64)
            if values.shape != (n,):
                raise RuntimeError(f"scorer {scorer.name!r} returned {column!r} of shape {values.shape}, expected ({n},)")
            out[column] = values
        context.update(out)
    return context
