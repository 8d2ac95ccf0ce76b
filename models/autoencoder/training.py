"""Lightning training of the causal :class:`~models.autoencoder.Autoencoder` on images and videos.

Loss per sample group: L1 + ``mse_weight`` * MSE on pixels, plus ``kl_weight`` * KL(posterior ||
N(0, I)) averaged over latent elements. A batch is either one group ``{"pixels": [B,3,T,H,W]}``
or several ``{"groups": [{"pixels": ...}, ...]}`` (e.g. an aspect-bucket of images and a group of
video clips in the same step), each with its own shape; the step's loss is the mean over all
samples, i.e. the group losses weighted by their sample counts.

The posterior noise of step t is drawn from a generator seeded by (seed, t, group), so a run is a
function of its seeds and data order, and a resumed run continues exactly without saved RNG
state: everything the module needs to resume is in its weights, the optimiser and the step.

Fitting it (images only, 32x32, the "demo" preset)::

    import lightning, torch
    from models.autoencoder import PRESETS
    from models.autoencoder.training import AutoencoderModule, AutoencoderTrainConfig

    torch.manual_seed(0)
    module = AutoencoderModule(PRESETS["demo"], AutoencoderTrainConfig(lr=1e-3, warmup_steps=20))
    pixels = torch.rand(512, 3, 1, 32, 32) * 2 - 1  # [N, 3, T, H, W] in [-1, 1]
    loader = torch.utils.data.DataLoader(
        [{"pixels": p} for p in pixels], batch_size=32, shuffle=True, drop_last=True)
    trainer = lightning.Trainer(max_steps=200, accelerator="cpu", precision="bf16-mixed",
                                logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, loader, val_dataloaders=loader)
    weights = module.model.state_dict()  # save with models.checkpoint.save_model_dir
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import lightning
import torch
import torch.nn.functional as F

from models.autoencoder.metrics import psnr, ssim
from models.autoencoder.model import Autoencoder, AutoencoderConfig, build
from models.training import clip_by_default, warmup_factor


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """Loss and optimiser settings of :class:`AutoencoderModule`."""

    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.0  # AdamW decay on conv kernels only (not biases or norms)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 20  # linear warmup from lr/warmup to lr, per optimiser step
    kl_weight: float = 1e-4  # weight of the KL term (mean over latent elements); small: it only keeps latents bounded
    mse_weight: float = 0.0  # weight of an extra MSE term next to L1 (MSE is what PSNR measures)
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    sample_posterior: bool = True  # train the decoder on posterior samples (VAE) rather than the mean
    seed: int = 0  # seeds the posterior noise of each step together with the step number

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # from JSON; frozen, so set through object.__setattr__
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("weight_decay", "kl_weight", "mse_weight", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.sample_posterior, bool):
            raise ValueError(f"sample_posterior must be a bool, got {self.sample_posterior!r}")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per sample, averaged over latent elements: [B,...] -> [B]."""
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).mean(dim=1)


def batch_groups(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The pixel tensors [B,3,T,H,W] of a batch: ``{"pixels": x}`` or ``{"groups": [{"pixels": x}, ...]}``."""
    if "groups" in batch:
        groups = [group["pixels"] for group in batch["groups"]]
    elif "pixels" in batch:
        groups = [batch["pixels"]]
    else:
        raise ValueError(f"batch needs 'pixels' or 'groups', got keys {sorted(batch)}")
    if not groups:
        raise ValueError("batch has no groups")
    for pixels in groups:
        if pixels.ndim != 5:
            raise ValueError(f"pixels must be [B,3,T,H,W] (an image is T=1), got {list(pixels.shape)}")
    return groups


def _step_seed(seed: int, step: int, group: int) -> int:
    """A 63-bit seed from (seed, step, group); hashed so nearby tuples give unrelated streams."""
    digest = hashlib.sha256(f"reelforge-autoencoder:{seed}:{step}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class AutoencoderModule(lightning.LightningModule):
    """Trains ``self.model`` (an :class:`Autoencoder`) to reconstruct pixels in [-1, 1].

    ``init_weights`` (a state dict) starts from an earlier autoencoder, e.g. an image-only one
    before joint image+video training.
    """

    def __init__(
        self,
        model_config: AutoencoderConfig,
        train: AutoencoderTrainConfig = AutoencoderTrainConfig(),
        init_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model_config
        self.train_config = train
        self.model: Autoencoder = build(model_config)
        if init_weights is not None:
            self.model.load_state_dict(init_weights, strict=True)

    def _group_losses(
        self, pixels: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one group (mean over its samples) and its parts, for logging."""
        cfg = self.train_config
        reconstruction, mean, logvar = self.model(pixels, sample_posterior=cfg.sample_posterior, generator=generator)
        reconstruction = reconstruction.float()
        target = pixels.float()
        l1 = F.l1_loss(reconstruction, target)
        kl = kl_divergence(mean, logvar).mean()
        loss = l1 + cfg.kl_weight * kl
        parts = {"l1": l1.detach(), "kl": kl.detach()}
        if cfg.mse_weight > 0:
            mse = F.mse_loss(reconstruction, target)
            loss = loss + cfg.mse_weight * mse
            parts["mse"] = mse.detach()
        return loss, parts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Sample-weighted loss over the batch's groups; logs train/loss, train/l1, train/kl."""
        groups = batch_groups(batch)
        total = sum(g.shape[0] for g in groups)
        loss = torch.zeros((), device=groups[0].device)
        logged: dict[str, torch.Tensor] = {}
        for index, pixels in enumerate(groups):
            generator = torch.Generator(device="cpu").manual_seed(
                _step_seed(self.train_config.seed, int(self.global_step), index))
            group_loss, parts = self._group_losses(pixels, generator)
            weight = pixels.shape[0] / total
            loss = loss + weight * group_loss
            for name, value in parts.items():
                logged[name] = logged.get(name, 0.0) + weight * value
        self.log("train/loss", loss, prog_bar=True, batch_size=total)
        for name, value in logged.items():
            self.log(f"train/{name}", value, batch_size=total)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruct from the posterior mean; logs val/l1, val/psnr, val/ssim and per kind (image, video)."""
        for pixels in batch_groups(batch):
            reconstruction, _, _ = self.model(pixels, sample_posterior=False)
            reconstruction = reconstruction.float().clamp(-1.0, 1.0)
            target = pixels.float()
            n = pixels.shape[0]
            kind = "image" if pixels.shape[2] == 1 else "video"
            values = {
                "l1": F.l1_loss(reconstruction, target),
                "psnr": psnr(reconstruction, target),
                "ssim": ssim(reconstruction, target),
            }
            for name, value in values.items():
                self.log(f"val/{name}", value, batch_size=n, sync_dist=True)
                self.log(f"val/{name}_{kind}", value, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on vectors) with a per-step linear warmup."""
        cfg = self.train_config
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(cfg.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm to grad_clip unless the Trainer was given its own value."""
        clip_by_default(self, optimizer, self.train_config.grad_clip, gradient_clip_val, gradient_clip_algorithm)
