"""Reconstruction metrics on [-1, 1] tensors: PSNR and SSIM for images [B,C,H,W] and videos [B,C,T,H,W].

Both return one value per sample (``reduction="none"``) or their mean (``reduction="mean"``,
the default). Values are computed in float64 so bf16 or float32 inputs give the same numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def _check_pair(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    """Same shape, at least [B, C, H, W]."""
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction {list(reconstruction.shape)} and target {list(target.shape)} differ in shape")
    if reconstruction.ndim < 3:
        raise ValueError(f"expected [B, C, ...] tensors, got {list(reconstruction.shape)}")


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Per-sample values [B] -> as asked."""
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of tensors in [-1, 1] (peak-to-peak range 2), any [B, C, ...] shape.

    Per sample: 10 * log10(2**2 / MSE), the MSE taken over all of that sample's values (every
    channel, frame and pixel), so a video is scored as one signal. Identical samples give +inf,
    and then so does the mean. Inputs are not clamped: clamp reconstructions first if that is
    what you want to score.
    """
    _check_pair(reconstruction, target)
    err = (reconstruction.double() - target.double()).pow(2).flatten(1).mean(dim=1)  # [B]
    values = 10.0 * torch.log10(4.0 / err)  # err == 0 -> +inf
    return _reduce(values.float(), reduction)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised 1D gaussian [size]."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    reduction: Reduction = "mean",
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of tensors in [-1, 1]; images [B,C,H,W] or videos [B,C,T,H,W].

    Gaussian window (11 taps, sigma 1.5), constants K1=0.01, K2=0.03 on the [0, 1] range, local
    statistics over fully covered positions only ("valid"), averaged over positions and channels
    of each frame; a video's value is the mean over its frames. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False,
    data_range=1)`` on the same frames. Frames smaller than the window use the largest odd window
    that fits. Identical inputs give 1.0.
    """
    _check_pair(reconstruction, target)
    if reconstruction.ndim == 5:  # [B, C, T, H, W] -> frames [B*T, C, H, W]
        B, C, T, H, W = reconstruction.shape
        a = reconstruction.transpose(1, 2).reshape(B * T, C, H, W)
        b = target.transpose(1, 2).reshape(B * T, C, H, W)
        per_frame = ssim(a, b, "none", window_size, sigma)  # [B*T]
        return _reduce(per_frame.view(B, T).mean(dim=1), reduction)
    if reconstruction.ndim != 4:
        raise ValueError(f"ssim takes [B,C,H,W] or [B,C,T,H,W], got {list(reconstruction.shape)}")
    B, C, H, W = reconstruction.shape
    size = min(window_size, H, W)
    size -= 1 - size % 2  # largest odd size that fits
    x = (reconstruction.double() + 1) / 2  # [0, 1]
    y = (target.double() + 1) / 2
    g = _gaussian_window(size, sigma, x.device)
    kernel_h = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def blur(v: torch.Tensor) -> torch.Tensor:
        """Separable depthwise gaussian filter, valid positions only."""
        return F.conv2d(F.conv2d(v, kernel_h, groups=C), kernel_w, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return _reduce(ssim_map.flatten(1).mean(dim=1).float(), reduction)

