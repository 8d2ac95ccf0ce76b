"""Shared plumbing of the two training stages (pretrain, quality-tune).

Reads the curated shards, embeds captions once with the frozen text encoder, trains the
Lightning module with MLflow logging into the stage's run, logs sample grids of fixed
prompts as training goes, and writes the Model artifact (safetensors + config + state).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from PIL import Image

from components import tracking
from components.config import Recipe, TrainConfig
from components.evaluate.prompts import load_prompts
from components.storage import iter_shard, read_manifest
from models.checkpoint import load_model_dir, save_model_dir
from models.dit import DiTConfig
from models.flow import FlowMatchingConfig
from models.generate import TextToImage, image_grid
from models.hardware import resolve_precision
from models.text_encoder import TextEmbeddings, TextEncoder
from models.training import CaptionedImageDataset, FlowMatchingModule, OptimConfig


@dataclass(frozen=True)
class SplitData:
    """One split of a curated dataset, in memory."""

    ids: list[str]
    images: torch.Tensor  # [N,3,H,W] uint8
    captions: list[str]
    categories: list[str]


def load_split(dataset_dir: Path, split: str, ids: set[str] | None = None) -> SplitData:
    """Decode a split's shards (optionally only `ids`) into memory, in manifest order."""
    manifest = read_manifest(dataset_dir)
    rows = manifest[manifest["split"] == split]
    if ids is not None:
        rows = rows[rows["id"].isin(ids)]
    wanted = set(rows["id"])
    found: dict[str, tuple[np.ndarray, str, str]] = {}
    for shard in sorted(rows["shard"].unique()):
        for sample in iter_shard(Path(dataset_dir) / shard):
            if sample.key in wanted:
                image = np.asarray(Image.open(io.BytesIO(sample.members["png"])).convert("RGB"))
                caption = sample.members.get("txt", b"").decode("utf-8", "replace")
                found[sample.key] = (image, caption, "")
    order = [i for i in rows["id"] if i in found]
    if not order:
        raise ValueError(f"{dataset_dir}: split '{split}' has no samples" + (" among the selected ids" if ids else ""))
    images = torch.from_numpy(np.stack([found[i][0] for i in order])).permute(0, 3, 1, 2).contiguous()
    categories = rows.set_index("id").loc[order, "category"].fillna("").astype(str).tolist()
    return SplitData(order, images, [found[i][1] for i in order], categories)


def configure_torch(threads: int) -> None:
    """CPU settings measured to matter here: all cores, flush denormals (slow first steps otherwise).

    Also quiets library chatter that buries the stage's own progress lines in KFP logs
    (Lightning's hardware/tips banner; library progress bars via `tracking.quiet_environment`).
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    # Lightning 2.6 builds a torch pytree LeafSpec that torch 2.13 flags as deprecated, once per batch.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    tracking.quiet_environment()


def embed(encoder: TextEncoder, captions: list[str], batch_size: int = 256) -> TextEmbeddings:
    """Embed captions once (training reuses them every epoch); duplicates are encoded once."""
    unique = sorted(set(captions))
    parts = [encoder.encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    table = TextEmbeddings(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                           torch.cat([p.pooled for p in parts]))
    position = {caption: i for i, caption in enumerate(unique)}
    return table.select(torch.tensor([position[c] for c in captions]))


class SampleGridCallback(lightning.Callback):
    """Logs a grid of the EMA model's samples for fixed prompts every `every` steps and at the end."""

    def __init__(self, tracker: tracking.StageTracker, generator: TextToImage, prompts: list[str], every: int,
                 sampling: dict[str, Any], stage: str) -> None:
        self.tracker, self.generator, self.prompts = tracker, generator, prompts
        self.every, self.sampling, self.stage = every, sampling, stage
        self.last_logged = -1

    def log_grid(self, step: int) -> None:
        """Sample the prompts and log `samples/<stage>_step_<step>.png`."""
        if step == self.last_logged:
            return
        images = self.generator(self.prompts, **self.sampling)
        self.tracker.log_image(Image.fromarray(image_grid(images, columns=8, upscale=2)),
                               f"samples/{self.stage}_step_{step:06d}.png")
        self.last_logged = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            self.log_grid(step)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        self.log_grid(trainer.global_step)


class PlainProgress(lightning.Callback):
    """One log line every ~10 s for non-interactive runs (KFP logs, CI), instead of a tqdm bar."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.start = self.last = 0.0

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.start = self.last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        now = time.monotonic()
        if now - self.last >= 10 or trainer.global_step == trainer.max_steps:
            self.last = now
            loss = trainer.callback_metrics.get("train/loss")
            loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
            rate = trainer.global_step / max(now - self.start, 1e-9)
            print(f"[{self.stage}] step {trainer.global_step}/{trainer.max_steps}{loss_text} ({rate:.1f} steps/s)",
                  file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainResult:
    """What a training stage produced."""

    directory: Path
    steps: int
    train_samples: int
    final_train_loss: float
    val_loss: float
    seconds: float
    images_per_second: float


def train(
    stage: str,
    recipe: Recipe,
    config: TrainConfig,
    dataset_dir: Path,
    output_dir: Path,
    tracker: tracking.StageTracker,
    init_dir: Path | None = None,
    train_ids: set[str] | None = None,
    lineage: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on the dataset's train split (or `train_ids` of it) and write a Model artifact."""
    configure_torch(config.threads)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    init_weights = None
    if init_dir is not None:
        init_weights, init_config, _ = load_model_dir(init_dir)
        model_fields = init_config["model"]
    else:
        model_fields = recipe.model_config_dict()
    model_config = DiTConfig(**model_fields)

    encoder = TextEncoder(max_tokens=recipe.text.max_tokens)
    train_split = load_split(dataset_dir, "train", train_ids)
    val_split = load_split(dataset_dir, "val")
    if train_split.images.shape[-1] != model_config.image_size:
        raise ValueError(f"{dataset_dir}: images are {train_split.images.shape[-1]} px but the model expects "
                         f"{model_config.image_size} px (curate.resolution vs model preset)")
    null_text = encoder.encode([""])
    train_set = CaptionedImageDataset(train_split.images, embed(encoder, train_split.captions))
    val_set = CaptionedImageDataset(val_split.images, embed(encoder, val_split.captions))
    flow = FlowMatchingConfig()
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                        ema_decay=config.ema_decay, caption_dropout=config.caption_dropout, grad_clip=config.grad_clip)
    module = FlowMatchingModule(model_config, flow, optim, null_text, init_weights=init_weights)
    tracker.log_metrics({f"{stage}.parameters": sum(p.numel() for p in module.model.parameters()),
                         f"{stage}.train_samples": len(train_set), f"{stage}.val_samples": len(val_set)})

    loader_generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, len(train_set))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                               generator=loader_generator, num_workers=0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(batch_size, 64), shuffle=False)

    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=tracker.run_id)
    grid_prompts = [p.text for p in load_prompts(recipe.evaluate.prompts, recipe.evaluate.grid_prompts)]
    sampling = {"steps": recipe.evaluate.sampling.steps, "guidance": recipe.evaluate.sampling.guidance,
                "seed": recipe.evaluate.sampling.seed, "solver": recipe.evaluate.sampling.solver}
    grids = SampleGridCallback(tracker, TextToImage(module.ema, encoder, {}, {}), grid_prompts,
                               config.sample_every, sampling, stage)
    interactive = sys.stderr.isatty()
    callbacks: list[lightning.Callback] = [grids] if interactive else [grids, PlainProgress(stage)]
    val_every = config.val_every if 0 < config.val_every <= config.steps else None
    precision = resolve_precision(config.precision)
    tracker.set_tags({f"{stage}.precision": precision})
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=config.steps,
        gradient_clip_val=config.grad_clip or None,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # Lightning checkpoints are pickles; we write safetensors ourselves
        enable_progress_bar=interactive,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(10, config.steps // 4)),
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=1.0 if val_every else 0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    started = time.monotonic()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader if val_every else None)
    seconds = time.monotonic() - started
    # Read before validate(): Lightning resets callback_metrics when a new loop starts.
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    # A separate trainer: the fit trainer may have validation switched off (limit_val_batches=0).
    validator = lightning.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    validated = validator.validate(module, dataloaders=val_loader, verbose=False)
    val_loss = float(validated[0]["val/loss"]) if validated else float("nan")
    throughput = config.steps * batch_size / max(seconds, 1e-9)
    state = {
        "stage": stage,
        "step": int(trainer.global_step),
        "metrics": {"train_loss": train_loss, "val_loss": val_loss, "images_per_second": throughput},
        "precision": precision,
        "train_samples": len(train_set),
        **(lineage or {}),
    }
    config_json = {
        "architecture": "dit",
        "model": model_config.to_dict() if hasattr(model_config, "to_dict") else asdict(model_config),
        "text": recipe.text.model_dump(mode="json"),
        "flow": asdict(flow),
        "sampling": recipe.register.sampling.model_dump(mode="json"),
        "training": {stage: config.model_dump(mode="json")},
        "recipe": recipe.model_dump(mode="json"),
    }
    weights = {k: v.detach().float().contiguous() for k, v in module.ema.state_dict().items()}
    save_model_dir(Path(output_dir), weights, config_json, state)
    return TrainResult(Path(output_dir), int(trainer.global_step), len(train_set), train_loss, val_loss,
                       seconds, throughput)
