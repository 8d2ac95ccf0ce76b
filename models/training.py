"""Lightning training of a :class:`~models.dit.DiT` with flow matching, EMA and caption dropout."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import lightning
import torch

from models.dit import DiT, DiTConfig, build
from models.flow import FlowMatchingConfig, flow_matching_loss, sample


class TextBatch(Protocol):
    """Anything with tokens [B,L,D], mask [B,L] and pooled [B,D], e.g. :class:`models.text_encoder.TextEmbeddings`."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, EMA and regularisation settings."""

    lr: float = 1e-3  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.0  # AdamW decay, applied to matrices only (not norms, biases, tables)
    betas: tuple[float, float] = (0.9, 0.95)  # beta2 < 0.999 reacts faster to loss spikes in transformers
    warmup_steps: int = 50  # linear warmup from ~0 to lr, per optimiser step
    ema_decay: float = 0.995  # final EMA decay; early updates use a smaller, warmed-up decay
    caption_dropout: float = 0.1  # probability of replacing a caption with the null caption (enables CFG)
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")


def _warmup_factor(warmup_steps: int):
    """LambdaLR multiplier: (step+1)/warmup until warmup ends, then 1."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


class FlowMatchingModule(lightning.LightningModule):
    """Trains ``self.model`` (a DiT) on flow matching and keeps an EMA copy ``self.ema`` for sampling.

    Batches are dicts with "image" [B,C,H,W] in [-1,1], "text_tokens" [B,L,D], "text_mask" [B,L]
    bool and "text_pooled" [B,D]. ``null_text`` is the empty-caption embedding (batch 1) used
    both for caption dropout and as the unconditional branch of classifier-free guidance; when
    omitted, an all-padding caption (zeros, mask all False) stands in.
    """

    def __init__(
        self,
        model_config: DiTConfig,
        flow: FlowMatchingConfig = FlowMatchingConfig(),
        optim: OptimConfig = OptimConfig(),
        null_text: TextBatch | None = None,
        init_weights: dict[str, torch.Tensor] | None = None,
        val_timesteps: int = 4,
    ) -> None:
        super().__init__()
        self.model_config = model_config
        self.flow = flow
        self.optim = optim
        self.val_timesteps = val_timesteps
        self.model: DiT = build(model_config)
        if init_weights is not None:
            self.model.load_state_dict(init_weights, strict=True)
        # Not seen by the optimiser: updated only in optimizer_step. Its train/eval mode is left to
        # Lightning because DiT has no dropout or batch norm, so the mode does not change outputs.
        self.ema: DiT = copy.deepcopy(self.model).requires_grad_(False)
        # A buffer, so a resumed run continues the EMA decay warmup where it stopped.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

        L, D = model_config.max_text_tokens, model_config.text_dim
        if null_text is None:
            tokens, mask, pooled = torch.zeros(1, L, D), torch.zeros(1, L, dtype=torch.bool), torch.zeros(1, D)
        else:
            tokens, mask, pooled = null_text.tokens, null_text.mask, null_text.pooled
        tokens = tokens.detach().float().reshape(1, -1, D)  # [1, L, D]
        mask = mask.detach().bool().reshape(1, -1)  # [1, L]
        pooled = pooled.detach().float().reshape(1, D)  # [1, D]
        if tokens.shape[1] != mask.shape[1]:
            raise ValueError(f"null_text tokens length {tokens.shape[1]} != mask length {mask.shape[1]}")
        self.register_buffer("null_tokens", tokens)
        self.register_buffer("null_mask", mask)
        self.register_buffer("null_pooled", pooled)

    def _apply_caption_dropout(
        self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Swap a random subset of captions for the null caption so the model also learns p(x)."""
        if self.optim.caption_dropout <= 0:
            return tokens, mask, pooled
        if tokens.shape[1] != self.null_tokens.shape[1]:
            raise ValueError(
                f"batch captions have {tokens.shape[1]} tokens but the null caption has {self.null_tokens.shape[1]}"
            )
        drop = torch.rand(tokens.shape[0], device=tokens.device) < self.optim.caption_dropout  # [B]
        tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype), tokens)
        mask = torch.where(drop[:, None], self.null_mask, mask)
        pooled = torch.where(drop[:, None], self.null_pooled.to(pooled.dtype), pooled)
        return tokens, mask, pooled

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Flow-matching loss at logit-normal t with caption dropout; logs train/loss."""
        tokens, mask, pooled = self._apply_caption_dropout(
            batch["text_tokens"], batch["text_mask"].bool(), batch["text_pooled"]
        )
        loss = flow_matching_loss(self.model, batch["image"], tokens, mask, pooled, self.flow)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _validation_times(self) -> torch.Tensor:
        """Quantiles of the training logit-normal, so val weights timesteps the way training does."""
        k = self.val_timesteps
        probs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        u = self.flow.logit_normal_mean + self.flow.logit_normal_std * torch.special.ndtri(probs)
        return torch.sigmoid(u).float()  # [k]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss averaged over fixed timesteps with noise from a per-batch fixed seed; logs val/loss.

        Deterministic for a given model and batch, so changes in val/loss reflect the weights
        rather than sampling noise, which is what early stopping needs.
        """
        images = batch["image"]
        B = images.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(1_000_003 + batch_idx)
        losses = []
        for t in self._validation_times():
            t_batch = torch.full((B,), float(t), device=images.device)
            losses.append(
                flow_matching_loss(
                    self.model,
                    images,
                    batch["text_tokens"],
                    batch["text_mask"].bool(),
                    batch["text_pooled"],
                    self.flow,
                    generator=generator,
                    t=t_batch,
                )
            )
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=B, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on vectors) with a per-step linear warmup."""
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(self.optim.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm to optim.grad_clip unless the Trainer was given its own value."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim.grad_clip
        if clip:
            algorithm = gradient_clip_algorithm or "norm"
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, then the EMA update (so a checkpoint taken after the step includes it)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA update after each optimiser step.

        Decay warms up as (1+n)/(10+n) so short runs are not dominated by the initial weights.
        Done in optimizer_step rather than on_train_batch_end: Lightning calls the callbacks'
        on_train_batch_end (where checkpoints are saved) before the module's, so an EMA updated
        there would be one step behind in every checkpoint. Lightning calls optimizer_step
        only for batches that step, so accumulation needs no special case.
        """
        self.ema_updates += 1
        n = int(self.ema_updates)
        decay = min(self.optim.ema_decay, (1 + n) / (10 + n))
        ema_params = list(self.ema.parameters())
        model_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)

    @torch.no_grad()
    def generate(
        self,
        captions_embeddings: TextBatch,
        steps: int = 25,
        guidance_scale: float = 4.0,
        seed: int = 0,
        solver: Literal["euler", "heun"] = "euler",
        schedule: Literal["linear_quadratic", "uniform"] = "linear_quadratic",
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Sample images [B,C,H,W] in [-1,1] with the EMA model and classifier-free guidance.

        The seed drives a CPU generator, so a seed gives the same images on any device.
        """
        device = self.null_tokens.device
        tokens = captions_embeddings.tokens.to(device).float()
        mask = captions_embeddings.mask.to(device).bool()
        pooled = captions_embeddings.pooled.to(device).float()
        cfg = self.model_config
        shape = (tokens.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = sample(
            self.ema,
            tokens,
            mask,
            pooled,
            self.null_tokens,
            self.null_mask,
            self.null_pooled,
            steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            shape=shape,
            solver=solver,
            schedule=schedule,
            autocast_dtype=autocast_dtype,
        )
        return images.clamp(-1.0, 1.0)


class CaptionedImageDataset(torch.utils.data.Dataset):
    """In-memory images (uint8 [N,C,H,W]) with precomputed caption embeddings, one per image.

    Items are dicts in the :class:`FlowMatchingModule` batch format; images become float in [-1,1].
    """

    def __init__(self, images: torch.Tensor, text: TextBatch) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {list(images.shape)}")
        n = images.shape[0]
        if not (text.tokens.shape[0] == text.mask.shape[0] == text.pooled.shape[0] == n):
            raise ValueError(
                f"need one caption per image: {n} images, tokens {text.tokens.shape[0]}, "
                f"mask {text.mask.shape[0]}, pooled {text.pooled.shape[0]}"
            )
        self.images = images
        self.tokens = text.tokens.float()
        self.mask = text.mask.bool()
        self.pooled = text.pooled.float()

    def __len__(self) -> int:
        """Number of samples."""
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sample: image [C,H,W] in [-1,1], text_tokens [L,D], text_mask [L], text_pooled [D]."""
        return {
            "image": self.images[index].float() / 127.5 - 1.0,
            "text_tokens": self.tokens[index],
            "text_mask": self.mask[index],
            "text_pooled": self.pooled[index],
        }


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of indices where the batch for optimiser step t depends only on (seed, t).

    Step t belongs to epoch t // batches_per_epoch, whose order is drawn from (seed, epoch) (a
    permutation, or weighted draws: see below); incomplete final batches are dropped. Iteration starts at `start_step`, so a
    run resumed at step k sees exactly the batches an uninterrupted run saw from step k on,
    whatever Lightning does with epochs: the sampler has no length, so Lightning runs one
    endless epoch bounded by max_steps instead of restarting an epoch from its first batch
    (which is what it does on a mid-epoch resume with a plain DataLoader).

    With `weights` (e.g. curation's concept-balancing weights, proportional to 1/sqrt(cluster
    size)), an epoch is `num_samples` draws with replacement in proportion to the weights
    instead of a permutation; still a function of (seed, epoch) only.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_step: int = 0,
                 weights: Sequence[float] | None = None) -> None:
        if batch_size < 1 or num_samples < batch_size:
            raise ValueError(f"need 1 <= batch_size <= num_samples, got batch_size={batch_size}, "
                             f"num_samples={num_samples}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples, self.batch_size, self.seed, self.start_step = num_samples, batch_size, seed, start_step
        self.batches_per_epoch = num_samples // batch_size
        self.weights = None
        if weights is not None:
            tensor = torch.as_tensor(list(weights), dtype=torch.float64)
            if tensor.shape != (num_samples,) or not torch.isfinite(tensor).all() or (tensor < 0).any() or tensor.sum() <= 0:
                raise ValueError(f"weights must be {num_samples} finite non-negative numbers with a positive sum")
            self.weights = tensor

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample indices of `epoch`: a permutation, or weighted draws (independent of the global RNG)."""
        # Hash (seed, epoch) rather than add them, so different seeds never share epoch orders.
        digest = hashlib.sha256(f"reelforge-batches:{self.seed}:{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        return torch.randperm(self.num_samples, generator=generator)

    def batch(self, step: int) -> list[int]:
        """Sample indices of the batch used by optimiser step `step` (0-based)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        start = position * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """Batches for steps start_step, start_step+1, ... without end."""
        step = self.start_step
        order, order_epoch = None, -1
        while True:
            epoch, position = divmod(step, self.batches_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per batch
                order, order_epoch = self.epoch_order(epoch), epoch
            start = position * self.batch_size
            yield order[start : start + self.batch_size].tolist()
            step += 1
