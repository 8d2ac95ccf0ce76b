"""Lightning training of a :class:`~models.dit.DiT` with flow matching, EMA and caption dropout.

A training batch is ``{"groups": [group, ...]}``: each group holds samples of one shape (one
aspect bucket of images, or one bucket of clips), so one optimiser step can mix images and
videos (Movie Gen's joint T2I + T2V training) while every forward pass stays a dense tensor:

    group = {"x": [B, C, T, H, W] latents (T = 1 for images), "text_tokens": [B, L, D],
             "text_mask": [B, L] bool, "text_pooled": [B, D], "media": "image" | "video"}

The step's loss is the sample-weighted mean over its groups. Which samples a step draws is a
function of (seed, step) only (:class:`StepPlan`), which is what makes resume exact.
"""

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


def warmup_factor(warmup_steps: int):
    """LambdaLR multiplier: (step+1)/warmup until warmup ends, then 1."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


def clip_by_default(module: lightning.LightningModule, optimizer: torch.optim.Optimizer, default: float,
                    gradient_clip_val: float | None, gradient_clip_algorithm: str | None) -> None:
    """Gradient clipping for a module's ``configure_gradient_clipping``: the Trainer's value, else `default` (0 = off)."""
    clip = gradient_clip_val if gradient_clip_val is not None else default
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")


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

    def _group_loss(self, group: dict[str, Any], t: float | None = None,
                    generator: torch.Generator | None = None, dropout: bool = False) -> torch.Tensor:
        """Flow-matching loss of one same-shape group (fixed t and generator for validation)."""
        tokens, mask, pooled = group["text_tokens"], group["text_mask"].bool(), group["text_pooled"]
        if dropout:
            tokens, mask, pooled = self._apply_caption_dropout(tokens, mask, pooled)
        x = group["x"]
        t_batch = None if t is None else torch.full((x.shape[0],), float(t), device=x.device)
        return flow_matching_loss(self.model, x, tokens, mask, pooled, self.flow, generator=generator, t=t_batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Sample-weighted flow-matching loss over the step's groups; logs train/loss and per-media losses."""
        groups = batch["groups"]
        sizes = [g["x"].shape[0] for g in groups]
        total = sum(sizes)
        loss = torch.zeros((), device=groups[0]["x"].device)
        for group, size in zip(groups, sizes):
            group_loss = self._group_loss(group, dropout=True)
            loss = loss + group_loss * (size / total)
            self.log(f"train/loss_{group.get('media', 'image')}", group_loss, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=total)
        return loss

    def _validation_times(self) -> torch.Tensor:
        """Quantiles of the training logit-normal, so val weights timesteps the way training does."""
        k = self.val_timesteps
        probs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        u = self.flow.logit_normal_mean + self.flow.logit_normal_std * torch.special.ndtri(probs)
        return torch.sigmoid(u).float()  # [k]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss averaged over fixed timesteps with noise from a per-batch fixed seed; logs val/loss.

        Deterministic for a given model and batch, so changes in val/loss reflect the weights
        rather than sampling noise, which is what early stopping needs. A validation batch may
        hold several groups (image and video); each is logged as val/loss_<media> too.
        """
        generator = torch.Generator(device="cpu").manual_seed(1_000_003 + batch_idx)
        groups = batch["groups"]
        total = sum(g["x"].shape[0] for g in groups)
        loss = torch.zeros((), device=groups[0]["x"].device)
        for group in groups:
            size = group["x"].shape[0]
            group_loss = torch.stack([self._group_loss(group, t=float(t), generator=generator)
                                      for t in self._validation_times()]).mean()
            loss = loss + group_loss * (size / total)
            self.log(f"val/loss_{group.get('media', 'image')}", group_loss, batch_size=size, sync_dist=True)
        self.log("val/loss", loss, prog_bar=True, batch_size=total, sync_dist=True)
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(self.optim.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm to optim.grad_clip unless the Trainer was given its own value."""
        clip_by_default(self, optimizer, self.optim.grad_clip, gradient_clip_val, gradient_clip_algorithm)

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
        frames: int = 1,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Sample latents [B,C,T,H,W] with the EMA model and classifier-free guidance.

        `frames`, `height`, `width` are latent sizes (default: 1 frame of the config's
        image_size). The seed drives a CPU generator, so a seed gives the same samples on any
        device. Unclamped: latents are not bounded; decode them with the latent codec.
        """
        device = self.null_tokens.device
        tokens = captions_embeddings.tokens.to(device).float()
        mask = captions_embeddings.mask.to(device).bool()
        pooled = captions_embeddings.pooled.to(device).float()
        cfg = self.model_config
        shape = (tokens.shape[0], cfg.in_channels, frames, height or cfg.image_size, width or cfg.image_size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return sample(
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


def _step_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts` (independent of the global RNG and of other streams)."""
    digest = hashlib.sha256(":".join(str(p) for p in ("reelforge-batches", *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class GroupSpec:
    """One same-shape group of training samples, as the step planner sees it."""

    stream: str  # "image" or "video": every step draws one group of each stream in the plan
    size: int  # number of samples in the group
    weights: tuple[float, ...] | None = None  # per-sample draw weights (None = uniform)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group of stream {self.stream!r} is empty")
        if self.weights is not None:
            weights = torch.as_tensor(self.weights, dtype=torch.float64)
            if weights.shape != (self.size,) or not torch.isfinite(weights).all() or (weights < 0).any() \
                    or weights.sum() <= 0:
                raise ValueError(f"weights must be {self.size} finite non-negative numbers with a positive sum")


class StepPlan:
    """Which samples optimiser step t trains on, as a function of (seed, t) only.

    For each stream (``image``, ``video``) with a batch size, a step picks one of the stream's
    groups (aspect buckets) with probability proportional to the group's total weight, then
    ``batch_size`` samples of it in proportion to their weights (curation's concept-balancing
    ``sample_weight``; uniform without), without replacement within the step unless the group
    is smaller than the batch. Nothing depends on earlier steps, so a run resumed at step k
    draws exactly what an uninterrupted run drew from step k on, whatever Lightning does with
    epochs or workers.
    """

    def __init__(self, groups: Sequence[GroupSpec], batch_sizes: dict[str, int], seed: int) -> None:
        self.groups, self.seed = list(groups), seed
        self.batch_sizes = {stream: size for stream, size in sorted(batch_sizes.items()) if size > 0}
        if not self.batch_sizes:
            raise ValueError("a step needs a positive batch size for at least one stream")
        self._members: dict[str, list[int]] = {}
        self._group_weights: dict[str, torch.Tensor] = {}
        self._sample_weights: list[torch.Tensor] = []
        for index, group in enumerate(self.groups):
            weights = torch.ones(group.size, dtype=torch.float64) if group.weights is None else \
                torch.as_tensor(group.weights, dtype=torch.float64)
            self._sample_weights.append(weights)
            self._members.setdefault(group.stream, []).append(index)
        for stream in self.batch_sizes:
            if stream not in self._members:
                raise ValueError(f"no {stream} samples to draw from (groups: {sorted(self._members)})")
            self._group_weights[stream] = torch.stack([self._sample_weights[i].sum() for i in self._members[stream]])

    def step(self, step: int) -> list[tuple[int, list[int]]]:
        """[(group index, sample indices)] for optimiser step `step` (0-based), one entry per stream."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        plan = []
        for stream, batch_size in self.batch_sizes.items():
            generator = _step_generator(self.seed, stream, step)
            members = self._members[stream]
            choice = int(torch.multinomial(self._group_weights[stream], 1, generator=generator))
            group = members[choice]
            weights = self._sample_weights[group]
            replacement = batch_size > int((weights > 0).sum())
            indices = torch.multinomial(weights, batch_size, replacement=replacement, generator=generator)
            plan.append((group, indices.tolist()))
        return plan


class StepSampler(torch.utils.data.Sampler[int]):
    """Endless batch numbers from `start_step`; pair with a dataset indexed by batch number.

    Having no length, it makes Lightning run one endless epoch bounded by max_steps instead of
    restarting an epoch from its first batch on a mid-epoch resume. With data parallelism
    (`world_size` > 1, used with ``Trainer(use_distributed_sampler=False)``), rank r of step s
    draws batch ``s * world_size + r``: every rank a different batch, and still a function of
    (seed, step), so resume stays exact for any number of devices.
    """

    def __init__(self, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[int]:
        """Batch numbers of steps start_step, start_step + 1, ... for this rank, without end."""
        step = self.start_step
        while True:
            yield step * self.world_size + self.rank
            step += 1
