"""Aesthetic scores (0..1, higher = more aesthetic): a documented default, or a head trained on human labels.

Emu picks its quality-tuning set by aesthetics, first automatically, then by people. Real
aesthetic predictors (the LAION predictor on CLIP embeddings) need weights that are not
available offline, so the scorer is pluggable:

- :class:`DefaultAestheticScorer` needs no labels and no weights: a deterministic heuristic
  from image statistics (sharpness, noise, colourfulness, contrast, exposure, composition,
  background simplicity). It is a technical-beauty prior, not taste.
- :class:`LearnedAestheticScorer` wraps an :class:`AestheticHead`: L2-regularised logistic
  regression on the curation's EfficientNet-Lite0 embeddings, trained from the accept/reject
  labels a reviewer gives in ``reelforge review`` (see ``components.curate.review``).

``load_aesthetic_scorer(config)`` picks one from the recipe's ``curate.aesthetic`` section.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import scipy.ndimage
import scipy.optimize
from numpy.typing import NDArray
from PIL import Image

from components.config import AestheticConfig

HEAD_FILE: Final[str] = "aesthetic_head.safetensors"
LABELS_FILE: Final[str] = "labels.parquet"
LABELS: Final[tuple[str, str]] = ("accept", "reject")
_HEAD_FORMAT: Final[str] = "reelforge-aesthetic-head"


class AestheticScorer(ABC):
    """Scores images for aesthetics: (N,) floats in 0..1, higher = more aesthetic."""

    name: str

    @abstractmethod
    def score(self, images: list[np.ndarray], features: np.ndarray) -> np.ndarray:
        """Score `images` (RGB uint8 HxWx3, any sizes) given their [N, 1280] EfficientNet-Lite0 embeddings (as curation stores them)."""


def _check_batch(images: list[np.ndarray], features: np.ndarray | None) -> None:
    if features is not None and len(features) != len(images):
        raise ValueError(f"got {len(images)} images but {len(features)} feature rows; they must pair up")


# ---------------------------------------------------------------------------------------------
# The default heuristic

# Scores depend on resolution (sharpness and noise especially), so every image is judged at
# the same scale: longer side at most this many pixels.
ANALYSIS_SIDE: Final[int] = 256
# Weight of each term in the final score (sum to 1). Sharpness and noise dominate because
# blur and sensor noise are what people reject first; composition is a weak prior.
DEFAULT_WEIGHTS: Final[dict[str, float]] = {
    "sharpness": 0.25,
    "noise_free": 0.20,
    "colourfulness": 0.15,
    "contrast": 0.15,
    "exposure": 0.10,
    "simplicity": 0.10,
    "composition": 0.05,
}
# Half-saturation points: a raw value equal to the constant maps to 0.5.
_SHARPNESS_HALF = 100.0  # Laplacian variance of denoised 0..255 luma ("below 100 looks blurry")
_COLOURFULNESS_HALF = 33.0  # Hasler & Suesstrunk: 33 is "moderately colourful"
_CONTRAST_HALF = 40.0  # std of 0..255 luma; well-exposed photos sit around 50-70
_NOISE_HALF = 3.0  # noise sigma in 8-bit levels that halves the noise term
_BORDER_HALF = 25.0  # std of 0..255 luma in the border ring
_CLIP_LOW, _CLIP_HIGH = 2.0, 253.0
# Rule-of-thirds power points plus the centre: a subject near any of them is "composed".
_ANCHORS = np.array([[1 / 3, 1 / 3], [1 / 3, 2 / 3], [2 / 3, 1 / 3], [2 / 3, 2 / 3], [0.5, 0.5]])
# Immerkaer's noise-estimation kernel: the difference of two Laplacians, blind to linear ramps.
_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def _analysis_copy(image: np.ndarray) -> NDArray[np.float64]:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"aesthetic scorer expects RGB uint8 (H, W, 3) images, got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise ValueError(f"aesthetic scorer got an empty image of shape {arr.shape}")
    height, width = arr.shape[:2]
    scale = ANALYSIS_SIDE / max(height, width)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return arr.astype(np.float64)


def aesthetic_terms(image: np.ndarray) -> dict[str, float]:
    """The default scorer's terms for one RGB uint8 image, each in 0..1 (higher = better).

    - ``sharpness``: variance of the Laplacian of the 3x3-median-filtered luma (the median
      keeps edges and removes most pixel noise, so noise does not pass for detail), s/(s+100).
    - ``noise_free``: 1/(1+(sigma/3)^2), sigma a robust Immerkaer noise estimate (median
      response of his kernel) over the flattest half of the image, so texture and edges do
      not count as noise.
    - ``colourfulness``: Hasler & Suesstrunk (2003), c/(c+33).
    - ``contrast``: RMS contrast (std of 0..255 luma), s/(s+40).
    - ``exposure``: 1 - 2|mean luma - 0.5|, times 1 - share of clipped pixels.
    - ``simplicity``: an uncluttered background: 1 - s/(s+25) for the luma std of the outer
      eighth of the frame (Ke et al. 2006 find simple backgrounds in pro photos).
    - ``composition``: the saliency centroid (edges plus colour distance from the border's mean
      colour) near a rule-of-thirds power point or the centre: 1 - distance/0.35, floored at 0.
    """
    rgb = _analysis_copy(image)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    height, width = luma.shape

    terms: dict[str, float] = {}
    if height >= 3 and width >= 3:
        smooth = scipy.ndimage.median_filter(luma, size=3, mode="nearest")
        lap = smooth[:-2, 1:-1] + smooth[2:, 1:-1] + smooth[1:-1, :-2] + smooth[1:-1, 2:] - 4.0 * smooth[1:-1, 1:-1]
        sharp = float(lap.var())
        response = np.abs(scipy.ndimage.convolve(luma, _NOISE_KERNEL, mode="nearest"))[1:-1, 1:-1]
        gradient = np.hypot(scipy.ndimage.sobel(luma, 0), scipy.ndimage.sobel(luma, 1))[1:-1, 1:-1]
        flat = gradient <= np.median(gradient)
        # The kernel turns pixel noise of std sigma into std 6 sigma; the median of |N(0, s)| is
        # 0.6745 s. A median (not Immerkaer's mean) ignores the few edge pixels left in `flat`.
        sigma = float(np.median(response[flat]) / (0.6745 * 6.0)) if flat.any() else 0.0
    else:
        sharp, sigma = 0.0, 0.0
        gradient = np.zeros_like(luma)
    terms["sharpness"] = sharp / (sharp + _SHARPNESS_HALF)
    terms["noise_free"] = 1.0 / (1.0 + (sigma / _NOISE_HALF) ** 2)

    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    terms["colourfulness"] = colourfulness / (colourfulness + _COLOURFULNESS_HALF)
    contrast = float(luma.std())
    terms["contrast"] = contrast / (contrast + _CONTRAST_HALF)
    clipped = float(np.mean((luma <= _CLIP_LOW) | (luma >= _CLIP_HIGH)))
    terms["exposure"] = float(np.clip((1.0 - abs(luma.mean() / 255.0 - 0.5) * 2.0) * (1.0 - clipped), 0.0, 1.0))

    ring = np.ones_like(luma, dtype=bool)
    inset_y, inset_x = max(1, height // 8), max(1, width // 8)
    ring[inset_y:height - inset_y, inset_x:width - inset_x] = False
    border_std = float(luma[ring].std())
    terms["simplicity"] = 1.0 - border_std / (border_std + _BORDER_HALF)

    border_colour = rgb[ring].mean(axis=0)
    saliency = np.linalg.norm(rgb - border_colour, axis=2)
    if gradient.shape == (height - 2, width - 2):
        saliency[1:-1, 1:-1] += gradient / 4.0  # Sobel's gain is 4
    total = float(saliency.sum())
    if total > 0:
        yy, xx = np.mgrid[0:height, 0:width]
        centre = np.array([(saliency * yy).sum() / total / max(height - 1, 1),
                           (saliency * xx).sum() / total / max(width - 1, 1)])
        distance = float(np.min(np.linalg.norm(_ANCHORS - centre, axis=1)))
        terms["composition"] = max(0.0, 1.0 - distance / 0.35)
    else:
        terms["composition"] = 0.0  # a blank frame has no subject to place
    return terms


class DefaultAestheticScorer(AestheticScorer):
    """Label-free aesthetic heuristic from image statistics; deterministic, no model weights.

    No aesthetic-predictor weights exist offline (no CLIP, no LAION predictor), so this scorer
    judges what can be measured: it rewards crisp (high denoised Laplacian variance), clean
    (low noise), colourful, contrasty, well-exposed (mid-grey mean, little clipping) images
    with a simple background and a subject near a rule-of-thirds point or the centre; the
    score is the weighted mean of the terms in :func:`aesthetic_terms` (weights in
    :data:`DEFAULT_WEIGHTS`), so it lies in 0..1. It ranks a degraded copy of an image below the
    original reliably; across different images it is a weak prior. Train a head on human
    labels (``reelforge review``) for real taste. Features are not used.
    """

    name = "default"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        """Optionally override the term weights (same keys as :data:`DEFAULT_WEIGHTS`)."""
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown aesthetic terms {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        total = sum(weights.values())
        if total <= 0 or any(w < 0 for w in weights.values()):
            raise ValueError(f"aesthetic term weights must be >= 0 with a positive sum, got {weights}")
        self.weights = {k: w / total for k, w in weights.items()}

    def score(self, images: list[np.ndarray], features: np.ndarray | None = None) -> np.ndarray:
        """Weighted mean of the heuristic terms per image, (N,) float64 in 0..1."""
        _check_batch(images, features)
        out = np.empty(len(images), dtype=np.float64)
        for index, image in enumerate(images):
            terms = aesthetic_terms(image)
            out[index] = sum(self.weights[k] * terms[k] for k in self.weights)
        return out


# ---------------------------------------------------------------------------------------------
# The head trained on human labels


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


class AestheticHead:
    """Logistic regression on image embeddings, trained from human accept (1) / reject (0) labels.

    Features are standardised with the training mean/std; the loss is the class-balanced
    mean log-loss plus ``l2 / 2 * |w|^2`` (balanced so a reviewer who rejects far more than
    they accept still gets a head that finds the accepts), minimised by L-BFGS from zero:
    the same labels always give the same head.
    """

    def __init__(self, l2: float = 0.1, max_iterations: int = 500) -> None:
        """`l2`: ridge strength on standardised features (higher = smoother, for few labels)."""
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = float(l2)
        self.max_iterations = int(max_iterations)
        self.weight: NDArray[np.float64] | None = None
        self.bias = 0.0
        self.feature_mean: NDArray[np.float64] | None = None
        self.feature_std: NDArray[np.float64] | None = None
        self.metadata: dict[str, Any] = {}

    @property
    def feature_dim(self) -> int:
        """Embedding width the head was trained on."""
        if self.weight is None:
            raise RuntimeError("the aesthetic head is not trained: call fit() or AestheticHead.load()")
        return int(self.weight.size)

    def _fit_weights(self, x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
        n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
        sample_weight = np.where(y > 0.5, y.size / (2.0 * n_pos), y.size / (2.0 * n_neg)) / y.size

        def loss_and_grad(params: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
            w, b = params[:-1], params[-1]
            z = x @ w + b
            # log(1 + e^z) - y z, stably
            loss = float(sample_weight @ (np.logaddexp(0.0, z) - y * z)) + 0.5 * self.l2 * float(w @ w)
            residual = sample_weight * (_sigmoid(z) - y)
            grad = np.concatenate([x.T @ residual + self.l2 * w, [residual.sum()]])
            return loss, grad

        result = scipy.optimize.minimize(loss_and_grad, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                                         options={"maxiter": self.max_iterations})
        return result.x[:-1], float(result.x[-1])

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "AestheticHead":
        """Train on [N, D] embeddings and 0/1 labels (1 = accept); records accuracies in `metadata`."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels).astype(np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.size:
            raise ValueError(f"features must be [N, D] with one row per label; got {x.shape} for {y.size} labels")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels must be 0 (reject) or 1 (accept)")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or Inf")
        n_accept, n_reject = int(y.sum()), int(y.size - y.sum())
        if n_accept < 2 or n_reject < 2:
            raise ValueError(
                f"training the aesthetic head needs at least 2 'accept' and 2 'reject' labels; got {n_accept} "
                f"accept and {n_reject} reject (label {max(0, 2 - n_accept)} more accept and "
                f"{max(0, 2 - n_reject)} more reject)")
        self.feature_mean = x.mean(axis=0)
        # Dimensions that never vary carry no signal; a unit std keeps them at zero.
        std = x.std(axis=0)
        self.feature_std = np.where(std > 1e-8, std, 1.0)
        standardised = (x - self.feature_mean) / self.feature_std
        self.weight, self.bias = self._fit_weights(standardised, y)
        train_accuracy = float(np.mean((self.predict(x) >= 0.5) == (y > 0.5)))
        self.metadata = {
            "format": _HEAD_FORMAT,
            "n_labels": int(y.size),
            "n_accept": n_accept,
            "n_reject": n_reject,
            "feature_dim": int(x.shape[1]),
            "l2": self.l2,
            "train_accuracy": train_accuracy,
            "cv_accuracy": self._cross_validate(x, y) if y.size >= 10 else None,
        }
        return self

    def _cross_validate(self, x: NDArray[np.float64], y: NDArray[np.float64], folds: int = 5) -> float:
        """Stratified k-fold accuracy (k <= the smaller class size), with a fixed fold assignment."""
        folds = max(2, min(folds, int(y.sum()), int(y.size - y.sum())))
        fold_of = np.empty(y.size, dtype=np.int64)
        rng = np.random.default_rng(0)
        for value in (0.0, 1.0):
            members = rng.permutation(np.flatnonzero(y == value))
            fold_of[members] = np.arange(members.size) % folds
        correct = 0
        for fold in range(folds):
            test = fold_of == fold
            train_y = y[~test]
            if train_y.sum() < 1 or (train_y.size - train_y.sum()) < 1:
                continue
            inner = AestheticHead(self.l2, self.max_iterations)
            inner.feature_mean = x[~test].mean(axis=0)
            std = x[~test].std(axis=0)
            inner.feature_std = np.where(std > 1e-8, std, 1.0)
            inner.weight, inner.bias = inner._fit_weights((x[~test] - inner.feature_mean) / inner.feature_std, train_y)
            correct += int(np.sum((inner.predict(x[test]) >= 0.5) == (y[test] > 0.5)))
        return correct / y.size

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probability of "accept" for each [N, D] embedding row, (N,) float64 in 0..1."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"the aesthetic head takes [N, {self.feature_dim}] features, got {x.shape}")
        assert self.feature_mean is not None and self.feature_std is not None and self.weight is not None
        return _sigmoid(((x - self.feature_mean) / self.feature_std) @ self.weight + self.bias)

    def save(self, path: str | Path) -> Path:
        """Write the head as safetensors plus a JSON sidecar (same name, .json) with its metadata."""
        from safetensors.numpy import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: an aesthetic head is saved as .safetensors")
        if self.weight is None:
            raise RuntimeError("the aesthetic head is not trained: nothing to save")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.astype(np.float64),
            "bias": np.array([self.bias], dtype=np.float64),
            "feature_mean": np.asarray(self.feature_mean, dtype=np.float64),
            "feature_std": np.asarray(self.feature_std, dtype=np.float64),
        }
        save_file(tensors, str(path), metadata={"format": _HEAD_FORMAT, "metadata": json.dumps(self.metadata)})
        path.with_suffix(".json").write_text(json.dumps(self.metadata, indent=2, sort_keys=True), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AestheticHead":
        """Read a head written by :meth:`save`; anything but a reelforge safetensors head is refused."""
        from safetensors import safe_open

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"refusing to load {path}: aesthetic heads are read from .safetensors only "
                             "(pickle-based formats can run code when loaded)")
        if not path.is_file():
            raise FileNotFoundError(f"aesthetic head {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path} is not a valid safetensors file: {error}") from error
        expected = {"weight", "bias", "feature_mean", "feature_std"}
        if header.get("format") != _HEAD_FORMAT or set(tensors) != expected:
            raise ValueError(f"{path} is not a reelforge aesthetic head (format {header.get('format')!r}, "
                             f"tensors {sorted(tensors)}; expected {sorted(expected)})")
        dim = tensors["weight"].size
        if tensors["feature_mean"].shape != (dim,) or tensors["feature_std"].shape != (dim,):
            raise ValueError(f"{path}: tensor shapes do not agree with a {dim}-d head")
        head = cls(l2=float(json.loads(header.get("metadata", "{}")).get("l2", 1.0)))
        head.weight = tensors["weight"].astype(np.float64)
        head.bias = float(tensors["bias"].reshape(-1)[0])
        head.feature_mean = tensors["feature_mean"].astype(np.float64)
        head.feature_std = tensors["feature_std"].astype(np.float64)
        head.metadata = json.loads(header.get("metadata", "{}"))
        return head


class LearnedAestheticScorer(AestheticScorer):
    """Aesthetic score = the human-trained head's probability of "accept" from the image embedding."""

    name = "learned"

    def __init__(self, head: AestheticHead) -> None:
        """Wrap a trained head."""
        self.head = head

    def score(self, images: list[np.ndarray], features: np.ndarray) -> np.ndarray:
        """The head's accept probability for each embedding row (images are not looked at)."""
        _check_batch(images, features)
        return self.head.predict(features)


def load_aesthetic_scorer(config: AestheticConfig) -> AestheticScorer:
    """The scorer a recipe asks for: the default heuristic, or the head in `config.review_dir`."""
    if config.review_dir is None:
        return DefaultAestheticScorer()
    path = Path(config.review_dir) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"curate.aesthetic.review_dir is {config.review_dir} but {path} does not exist; create it with "
            "`reelforge review import --labels CSV --dataset DIR --out REVIEW_DIR`, or unset review_dir")
    return LearnedAestheticScorer(AestheticHead.load(path))


def review_labels(config: AestheticConfig) -> dict[str, str]:
    """Human labels by sample id ("accept"/"reject") from `config.review_dir`; {} when there is none."""
    if config.review_dir is None:
        return {}
    path = Path(config.review_dir) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"curate.aesthetic.review_dir is {config.review_dir} but {path} does not exist; "
            "write it with `reelforge review import`")
    frame = pd.read_parquet(path, columns=["id", "label"])
    bad = sorted(set(frame["label"]) - set(LABELS))
    if bad:
        raise ValueError(f"{path}: labels must be accept or reject, found {bad}")
    return dict(zip(frame["id"].astype(str), frame["label"].astype(str)))
