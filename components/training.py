"""Shared plumbing of the two training stages (pretrain, quality-tune).

Reads the curated shards, embeds captions once with the frozen text encoder, trains the
Lightning module with MLflow logging into the stage's run, logs sample grids of fixed
prompts as training goes, and writes the Model artifact (safetensors + config + state).

Training is resumable: every `checkpoint_every` steps (and at the last step) a checkpoint
(safetensors + JSON, see models.checkpoint) goes to the stage's checkpoint directory
(components.checkpoints), and a run that finds one there continues from the newest valid one
with model, optimizer, EMA, LR schedule, RNG states and data position restored, so its final
weights equal an uninterrupted run's bit for bit (CPU, deterministic mode).
"""

from __future__ import annotations

import contextlib
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
from components.checkpoints import checkpoint_dir, checkpoint_key, exclusive
from components.config import Recipe, TrainConfig
from components.evaluate.prompts import load_prompts
from components.media import sha256_file
from components.storage import dataset_hash, iter_shard, read_manifest, sha256_json
from models.checkpoint import (WEIGHTS_FILE, latest_training_checkpoint, load_model_dir, read_checkpoint_state,
                               save_model_dir)
from models.dit import DiTConfig
from models.flow import FlowMatchingConfig
from models.generate import TextToImage, image_grid
from models.hardware import resolve_precision
from models.resume import PeriodicCheckpoint, SafetensorsCheckpointIO
from models.text_encoder import TextEmbeddings, TextEncoder
from models.training import CaptionedImageDataset, FlowMatchingModule, OptimConfig, StepBatchSampler


@dataclass(frozen=True)
class SplitData:
    """One split of a curated dataset, in memory."""

    ids: list[str]
    images: torch.Tensor  # [N,3,H,W] uint8
    captions: list[str]
    categories: list[str]
    weights: list[float]  # concept-balancing sample weights from curation (1.0 where absent)


def load_split(dataset_dir: Path, split: str, ids: set[str] | None = None) -> SplitData:
    """Decode a split's shards (optionally only `ids`) into memory, in manifest order."""
    manifest = read_manifest(dataset_dir)
    rows = manifest[manifest["split"] == split]
    if "media" in rows.columns:  # video clips are curated too; the image model trains on images
        rows = rows[rows["media"] == "image"]
    if "bucket" in rows.columns and rows["bucket"].nunique() > 1:
        raise ValueError(f"{dataset_dir}: split '{split}' has aspect buckets {sorted(rows['bucket'].unique())}; "
                         "the pixel-space DiT trains on one square size: curate with curate.buckets: ['1:1']")
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
    indexed = rows.set_index("id").loc[order]
    categories = indexed["category"].fillna("").astype(str).tolist()
    weights = indexed["sample_weight"].fillna(1.0).astype(float).tolist() if "sample_weight" in indexed else [1.0] * len(order)
    return SplitData(order, images, [found[i][1] for i in order], categories, weights)


def configure_torch(threads: int) -> None:
    """CPU settings measured to matter here: all cores, flush denormals (slow first steps otherwise), determinism.

    Also quiets library chatter that buries the stage's own progress lines in KFP logs
    (Lightning's hardware/tips banner; library progress bars via `tracking.quiet_environment`).
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    # Trainer(deterministic=True) turns on torch.use_deterministic_algorithms, which does not cover
    # oneDNN: its convolution backward (the DiT's patch embedding) then differs from process to
    # process with more than one thread, and so do the final weights and exact resume.
    torch.backends.mkldnn.deterministic = True
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
        self.first_step = 0

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.start = self.last = time.monotonic()
        self.first_step = trainer.global_step  # > 0 after a resume; the rate counts this run's steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        now = time.monotonic()
        if now - self.last >= 10 or trainer.global_step == trainer.max_steps:
            self.last = now
            loss = trainer.callback_metrics.get("train/loss")
            loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
            rate = (trainer.global_step - self.first_step) / max(now - self.start, 1e-9)
            print(f"[{self.stage}] step {trainer.global_step}/{trainer.max_steps}{loss_text} ({rate:.1f} steps/s)",
                  file=sys.stderr, flush=True)


class DataPositionCheck(lightning.Callback):
    """Fails fast if Lightning's restored step and the sampler's first step disagree (batches would shift)."""

    def __init__(self, sampler: StepBatchSampler) -> None:
        self.sampler = sampler

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.global_step != self.sampler.start_step:
            raise RuntimeError(f"resumed at step {trainer.global_step} but the data sampler starts at step "
                               f"{self.sampler.start_step}; the checkpoint and its step disagree")


@dataclass(frozen=True)
class Resume:
    """Where a training stage keeps checkpoints and which one (if any) it continues from."""

    directory: Path | None  # None when checkpointing is off
    checkpoint: Path | None  # the newest valid checkpoint, None to start from step 0
    step: int  # global step of `checkpoint` (0 without one)


def find_resume(stage: str, recipe: Recipe, config: TrainConfig, model_fields: dict[str, Any], dataset_dir: Path,
                output_dir: Path, train_ids: list[str], init_dir: Path | None,
                held: contextlib.ExitStack) -> Resume:
    """The stage's checkpoint directory for these inputs, and the newest valid checkpoint in it.

    The directory's lock is entered into `held` (the caller keeps it until training ends).
    Checkpoints that do not verify (an interrupted write, a truncated or replaced file) are
    reported and skipped, so the previous one is used.
    """
    if config.checkpoint_every <= 0:
        return Resume(None, None, 0)
    inputs = {"dataset": dataset_hash(dataset_dir), "train_ids": sha256_json(train_ids)}
    if init_dir is not None:
        inputs["init_weights"] = sha256_file(Path(init_dir) / WEIGHTS_FILE)
    settings = {"train": config.model_dump(mode="json"), "model": model_fields,
                "text": recipe.text.model_dump(mode="json")}
    key = checkpoint_key(stage, settings, inputs)
    directory = checkpoint_dir(stage, key, output_dir, description={"stage": stage, "recipe": recipe.name,
                                                                     "settings": settings, "inputs": inputs})
    held.enter_context(exclusive(directory))
    latest, skipped = latest_training_checkpoint(directory)
    for problem in skipped:
        print(f"[{stage}] ignoring checkpoint: {problem}", file=sys.stderr, flush=True)
    if latest is None:
        return Resume(directory, None, 0)
    return Resume(directory, latest, int(read_checkpoint_state(latest)["global_step"]))


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
    """Train on the dataset's train split (or `train_ids` of it) and write a Model artifact.

    Resumes from the newest valid checkpoint of an earlier run with the same settings and
    inputs (see components.checkpoints for where they live) and checkpoints as it goes.
    """
    with contextlib.ExitStack() as held:  # the checkpoint directory's lock, until the artifact is written
        return _train(stage, recipe, config, dataset_dir, output_dir, tracker, init_dir, train_ids, lineage, held)


def _train(stage: str, recipe: Recipe, config: TrainConfig, dataset_dir: Path, output_dir: Path,
           tracker: tracking.StageTracker, init_dir: Path | None, train_ids: set[str] | None,
           lineage: dict[str, Any] | None, held: contextlib.ExitStack) -> TrainResult:
    """:func:`train`, with `held` keeping the checkpoint directory locked until it returns."""
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

    resume = find_resume(stage, recipe, config, model_fields, dataset_dir, output_dir, train_split.ids, init_dir,
                         held)
    if resume.checkpoint is not None:
        print(f"[{stage}] resuming from step {resume.step} (checkpoint {resume.checkpoint})", file=sys.stderr,
              flush=True)
    tracker.set_tags({f"{stage}.resumed": str(resume.checkpoint is not None).lower(),
                      f"{stage}.resumed_from_step": resume.step,
                      f"{stage}.checkpoint_dir": str(resume.directory or "")})

    batch_size = min(config.batch_size, len(train_set))
    # Batches are a function of (seed, step), starting at the resumed step: see StepBatchSampler.
    sampler = StepBatchSampler(len(train_set), batch_size, config.seed, start_step=resume.step,
                               weights=train_split.weights if config.balanced else None)
    # Both loaders get their own generator: a DataLoader without one draws its base seed from the
    # global RNG each time it is iterated, so the validation runs inside fit would shift caption
    # dropout and noise, and a resumed run (which skips the validation at its checkpoint step)
    # would diverge from an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=0,
                                               generator=torch.Generator().manual_seed(config.seed))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(batch_size, 64), shuffle=False,
                                             generator=torch.Generator().manual_seed(config.seed))

    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=tracking.tracking_uri(), run_id=tracker.run_id)
    grid_prompts = [p.text for p in load_prompts(recipe.evaluate.prompts, recipe.evaluate.grid_prompts)]
    sampling = {"steps": recipe.evaluate.sampling.steps, "guidance": recipe.evaluate.sampling.guidance,
                "seed": recipe.evaluate.sampling.seed, "solver": recipe.evaluate.sampling.solver}
    grids = SampleGridCallback(tracker, TextToImage(module.ema, encoder, {}, {}), grid_prompts,
                               config.sample_every, sampling, stage)
    interactive = sys.stderr.isatty()
    callbacks: list[lightning.Callback] = [grids] if interactive else [grids, PlainProgress(stage)]
    callbacks.append(DataPositionCheck(sampler))
    checkpointer = None
    if resume.directory is not None:
        checkpointer = PeriodicCheckpoint(resume.directory, config.checkpoint_every, config.keep_checkpoints)
        callbacks.append(checkpointer)
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
        # Lightning's own .ckpt files are pickles: checkpoints are written by PeriodicCheckpoint through
        # the safetensors CheckpointIO, or not at all.
        enable_checkpointing=checkpointer is not None,
        plugins=[SafetensorsCheckpointIO()],
        enable_progress_bar=interactive,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(10, config.steps // 4)),
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=1.0 if val_every else 0,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    # Re-seed after the set-up: set-up code (model loading) leaves the global RNG in a different
    # state the first time it runs in a process than later (measured: two runs in one process
    # started training from different RNG states), which would shift caption dropout and noise.
    lightning.seed_everything(config.seed + 1, workers=True, verbose=False)
    started = time.monotonic()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader if val_every else None,
                ckpt_path=resume.checkpoint)
    seconds = time.monotonic() - started
    steps_run = int(trainer.global_step) - resume.step
    # Read before validate(): Lightning resets callback_metrics when a new loop starts.
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    if steps_run == 0 and checkpointer is not None and checkpointer.last_train_loss is not None:
        train_loss = checkpointer.last_train_loss  # resumed at the last step: nothing was trained now
    # A separate trainer: the fit trainer may have validation switched off (limit_val_batches=0).
    validator = lightning.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    validated = validator.validate(module, dataloaders=val_loader, verbose=False)
    val_loss = float(validated[0]["val/loss"]) if validated else float("nan")
    throughput = steps_run * batch_size / max(seconds, 1e-9)
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
