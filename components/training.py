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
import json
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
from lightning.pytorch.callbacks import EarlyStopping
import torch
from PIL import Image

from components import tracking
from components.checkpoints import checkpoint_dir, checkpoint_key, exclusive
from components.config import Recipe, TrainConfig
from components.evaluate.prompts import load_prompts
from components.media import sha256_file
from components.storage import dataset_hash, iter_shard, read_manifest, sha256_json
from components.train_data import (MediaGroup, StepDataset, ValidationBatches, cache_root, codec_fingerprint,
                                   embed_groups, encode_groups, group_specs, load_groups)
from models.checkpoint import (WEIGHTS_FILE, latest_training_checkpoint, load_model_dir, read_checkpoint_state,
                               save_model_dir, save_weights)
from models.dit import DiTConfig
from models.flow import FlowMatchingConfig
from models.generate import AUTOENCODER_FILE, TextToImage, image_grid
from models.hardware import resolve_precision
from models.resume import PeriodicCheckpoint, SafetensorsCheckpointIO
from models.text_encoder import TextEmbeddings, TextEncoder
from models.training import FlowMatchingModule, OptimConfig, StepPlan, StepSampler


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
    """Logs the EMA model's samples for fixed prompts every `every` steps and at the end.

    Images go to `samples/<stage>_step_<N>.png` as a grid; video stages also log a tiled clip
    of the first prompts as `samples/<stage>_step_<N>.mp4` and `.gif`.
    """

    def __init__(self, tracker: tracking.StageTracker, generator: TextToImage, prompts: list[str], every: int,
                 sampling: dict[str, Any], stage: str, video: dict[str, int] | None = None) -> None:
        self.tracker, self.generator, self.prompts = tracker, generator, prompts
        self.every, self.sampling, self.stage, self.video = every, sampling, stage, video
        self.last_logged = -1

    def log_grid(self, step: int) -> None:
        """Sample the prompts and log the grid (and the clip grid for video stages)."""
        if step == self.last_logged:
            return
        images = self.generator(self.prompts, **self.sampling)
        self.tracker.log_image(Image.fromarray(image_grid(images, columns=8, upscale=2)),
                               f"samples/{self.stage}_step_{step:06d}.png")
        if self.video:
            clips = self.generator(self.prompts[: self.video.get("prompts", 4)], frames=self.video["frames"],
                                   height=self.video.get("height"), width=self.video.get("width"), **self.sampling)
            self.tracker.log_video(clips, f"samples/{self.stage}_step_{step:06d}", fps=self.video.get("fps", 8))
        self.last_logged = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = trainer.global_step
        if trainer.is_global_zero and self.every and step % self.every == 0 and step < trainer.max_steps:
            self.log_grid(step)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.is_global_zero:
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
            # One write per line: ranks of a DDP run share stderr, and print's separate newline write
            # let their lines run together.
            sys.stderr.write(f"[{self.stage}] step {trainer.global_step}/{trainer.max_steps}{loss_text} "
                             f"({rate:.1f} steps/s)\n")
            sys.stderr.flush()


class DataPositionCheck(lightning.Callback):
    """Fails fast if Lightning's restored step and the sampler's first step disagree (batches would shift)."""

    def __init__(self, sampler: StepSampler | None = None) -> None:
        self.sampler = sampler  # set once the trainer (and so the rank) is known

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.global_step != self.sampler.start_step:
            raise RuntimeError(f"resumed at step {trainer.global_step} but the data sampler starts at step "
                               f"{self.sampler.start_step}; the checkpoint and its step disagree")


class WeightAveraging(lightning.Callback):
    """Keeps the EMA weights of the last `keep` validation points; their mean becomes the final model.

    Movie Gen averages SFT checkpoints; averaging nearby points of one run smooths out the
    noise of a small, quickly-overfitting set. The snapshots are part of the training
    checkpoint (tensors, so safetensors), so a resumed run averages the same points.
    """

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.sanity_checking or trainer.state.fn != "fit":  # not the final validate() of the EMA
            return
        step = trainer.global_step
        if self.snapshots and self.snapshots[-1][0] == step:
            return
        weights = {k: v.detach().float().cpu().clone() for k, v in pl_module.ema.state_dict().items()}
        self.snapshots = (self.snapshots + [(step, weights)])[-self.keep:]

    def averaged(self) -> tuple[dict[str, torch.Tensor] | None, list[int]]:
        """(mean of the kept snapshots, their steps); (None, []) before any validation."""
        if not self.snapshots:
            return None, []
        names = self.snapshots[0][1].keys()
        mean = {name: torch.stack([w[name] for _, w in self.snapshots]).mean(0) for name in names}
        return mean, [step for step, _ in self.snapshots]

    def state_dict(self) -> dict[str, Any]:
        """Snapshots for the training checkpoint."""
        return {"steps": [step for step, _ in self.snapshots], "weights": [w for _, w in self.snapshots]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the snapshots of a resumed run."""
        self.snapshots = list(zip(state_dict.get("steps", []), state_dict.get("weights", [])))


class ResumableEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on val/loss that also stays stopped across a resume.

    A run killed after early stopping fired (its last checkpoint is the stopping point, saved
    after that validation: see PeriodicCheckpoint.on_validation_end) would otherwise train on
    past it when re-run, and end with other weights than the run that finished; with this, the
    re-run trains no further.
    """

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        if self.wait_count >= self.patience:
            trainer.should_stop = True


@dataclass(frozen=True)
class Resume:
    """Where a training stage keeps checkpoints and which one (if any) it continues from."""

    directory: Path | None  # None when checkpointing is off
    checkpoint: Path | None  # the newest valid checkpoint, None to start from step 0
    step: int  # global step of `checkpoint` (0 without one)


def find_resume(stage: str, recipe: Recipe, config: TrainConfig, settings: dict[str, Any],
                inputs: dict[str, str], output_dir: Path, held: contextlib.ExitStack) -> Resume:
    """The stage's checkpoint directory for these settings and inputs, and the newest valid checkpoint in it.

    The directory's lock is entered into `held` (the caller keeps it until training ends).
    Checkpoints that do not verify (an interrupted write, a truncated or replaced file) are
    reported and skipped, so the previous one is used.
    """
    if config.checkpoint_every <= 0:
        return Resume(None, None, 0)
    key = checkpoint_key(stage, settings, inputs)
    directory = checkpoint_dir(stage, key, output_dir, description={"stage": stage, "recipe": recipe.name,
                                                                     "settings": settings, "inputs": inputs})
    if tracking.is_primary_process():  # data-parallel workers read the same checkpoints; rank 0 writes them
        held.enter_context(exclusive(directory))
    latest, skipped = latest_training_checkpoint(directory)
    for problem in skipped:
        print(f"[{stage}] ignoring checkpoint: {problem}", file=sys.stderr, flush=True)
    if latest is None:
        return Resume(directory, None, 0)
    return Resume(directory, latest, int(read_checkpoint_state(latest)["global_step"]))


@dataclass(frozen=True)
class TrainSpec:
    """What one flow-matching training run trains on (a pretraining stage, or quality-tuning)."""

    stage: str  # name in tracking, checkpoints and logs, e.g. "pretrain-t2i" or "quality_tune"
    config: TrainConfig  # optimiser, steps, precision, hardware
    media: tuple[str, ...] = ("image",)  # "image" and/or "video" groups in every step
    resolution: int | None = None  # 1:1 side in pixels (None = the curated resolution)
    frames: int = 1  # pixel frames per clip window (video)
    video_batch_size: int = 0  # clips per step next to config.batch_size images
    early_stopping_patience: int = 0  # validations without a new best val/loss before stopping (0 = off)
    average_last: int = 1  # average the EMA weights of the last N validation points


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
    stopped_early: bool = False
    averaged_steps: tuple[int, ...] = ()


def lightning_strategy(config: TrainConfig) -> Any:
    """The Lightning strategy for a recipe's `strategy`: auto, DDP, or FSDP sharding every DiT block.

    FSDP wraps each transformer block (and checkpoints its activations when the model asks
    for gradient checkpointing) and gathers full state dicts for checkpoints, so the
    safetensors checkpoint format and exact resume stay the same as on one device.
    """
    if config.strategy == "auto":
        return "auto"
    if config.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    from lightning.pytorch.strategies import FSDPStrategy

    from models.dit.model import DiTBlock

    return FSDPStrategy(auto_wrap_policy={DiTBlock}, activation_checkpointing_policy={DiTBlock},
                        state_dict_type="full", sharding_strategy="FULL_SHARD")


def _accelerator(config: TrainConfig) -> str:
    """Lightning accelerator: the recipe's choice, with auto = GPU when one is visible."""
    if config.accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return config.accelerator


def build_trainer(config: Any, *, logger: Any, callbacks: list[lightning.Callback], checkpointing: bool,
                  val_every: int | None, progress_bar: bool) -> lightning.Trainer:
    """The Lightning Trainer every training stage uses (and the throughput benchmark measures).

    Deterministic, safetensors-only checkpoint IO, the recipe's accelerator / strategy /
    precision / devices, step-based validation, no sanity validation.
    """
    return lightning.Trainer(
        accelerator=_accelerator(config),
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=lightning_strategy(config),
        precision=resolve_precision(config.precision),
        max_steps=config.steps,
        gradient_clip_val=config.grad_clip or None,
        logger=logger,
        callbacks=callbacks,
        # Lightning's own .ckpt files are pickles: checkpoints are written by PeriodicCheckpoint through
        # the safetensors CheckpointIO, or not at all.
        enable_checkpointing=checkpointing,
        plugins=[SafetensorsCheckpointIO()],
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(10, config.steps // 4)),
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        limit_val_batches=1.0 if val_every else 0,
        num_sanity_val_steps=0,
        deterministic=True,
        # Batches come from StepSampler, which gives every rank its own batch per step itself.
        use_distributed_sampler=False,
    )


def load_codec_dir(codec_dir: Path | None) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor] | None]:
    """(codec, its config dict, autoencoder weights or None) from an autoencoder stage's output."""
    from models.latent import PixelCodec, codec_from_dict

    if codec_dir is None:
        return PixelCodec(), PixelCodec().to_dict(), None
    weights, config, _ = load_model_dir(Path(codec_dir)) if (Path(codec_dir) / WEIGHTS_FILE).is_file() else \
        (None, json.loads((Path(codec_dir) / "config.json").read_text(encoding="utf-8")), None)
    latent = config["latent"]
    if latent.get("kind", "pixel") == "pixel":
        return PixelCodec(), latent, None
    return codec_from_dict(latent, weights), latent, weights


def train(spec: TrainSpec, recipe: Recipe, dataset_dir: Path, output_dir: Path, tracker: tracking.StageTracker,
          codec_dir: Path | None = None, init_dir: Path | None = None, train_ids: set[str] | None = None,
          lineage: dict[str, Any] | None = None) -> TrainResult:
    """Train on the dataset's train split (or `train_ids` of it) and write a Model artifact.

    `codec_dir` is the autoencoder stage's output (None = pixel space), `init_dir` the model
    to continue from (an earlier pretraining stage, or the pretrained model for quality-tuning).
    Resumes from the newest valid checkpoint of an earlier run with the same settings and
    inputs (see components.checkpoints for where they live) and checkpoints as it goes.
    """
    with contextlib.ExitStack() as held:  # the checkpoint directory's lock, until the artifact is written
        return _train(spec, recipe, Path(dataset_dir), Path(output_dir), tracker, codec_dir, init_dir, train_ids,
                      lineage, held)


def _train(spec: TrainSpec, recipe: Recipe, dataset_dir: Path, output_dir: Path, tracker: tracking.StageTracker,
           codec_dir: Path | None, init_dir: Path | None, train_ids: set[str] | None,
           lineage: dict[str, Any] | None, held: contextlib.ExitStack) -> TrainResult:
    """:func:`train`, with `held` keeping the checkpoint directory locked until it returns."""
    stage, config = spec.stage, spec.config
    configure_torch(config.threads)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    init_weights = None
    if init_dir is not None:
        init_weights, init_config, _ = load_model_dir(init_dir)
        model_fields = init_config["model"]
    else:
        model_fields = recipe.model_config_dict()
    model_config = DiTConfig.from_dict(model_fields)
    codec, codec_dict, codec_weights = load_codec_dir(codec_dir)
    if codec.channels != model_config.in_channels:
        raise ValueError(f"the latent space has {codec.channels} channels but the model expects "
                         f"{model_config.in_channels} (autoencoder.kind / model preset)")

    # --- data: same-shape groups, encoded once (cached) and with cached caption embeddings
    resolution = spec.resolution or recipe.curate.resolution
    multiple = codec.spatial_downsample * model_config.patch_size
    load = dict(resolution=resolution, curated_resolution=recipe.curate.resolution, multiple=multiple,
                frames=spec.frames)
    encoder = TextEncoder(model_path=recipe.text.model_path, max_tokens=recipe.text.max_tokens)
    if encoder.dim != model_config.text_dim:
        raise ValueError(f"the text encoder {encoder.model_path} gives {encoder.dim}-dim embeddings but the model's "
                         f"text_dim is {model_config.text_dim}: set model.overrides.text_dim")
    codec_id = codec_fingerprint(codec_dir if codec_weights is not None else None)
    train_groups, val_groups, hits = prepared_groups(dataset_dir, spec.media, load, codec, codec_id, encoder,
                                                     output_dir, cache=config.precompute_latents, train_ids=train_ids)
    for group in train_groups:
        print(f"[{stage}] train {group.describe()}", file=sys.stderr, flush=True)
    train_ids_all = [i for g in train_groups for i in g.ids]
    train_samples = len(train_ids_all)

    null_text = encoder.encode([""])
    flow = FlowMatchingConfig()
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                        ema_decay=config.ema_decay, caption_dropout=config.caption_dropout, grad_clip=config.grad_clip)
    module = FlowMatchingModule(model_config, flow, optim, null_text, init_weights=init_weights)
    tracker.log_metrics({f"{stage}.parameters": sum(p.numel() for p in module.model.parameters()),
                         f"{stage}.train_samples": train_samples,
                         f"{stage}.val_samples": sum(len(g.ids) for g in val_groups),
                         f"{stage}.latent_cache_hits": hits})

    inputs = {"dataset": dataset_hash(dataset_dir), "train_ids": sha256_json(train_ids_all), "codec": codec_id}
    if init_dir is not None:
        inputs["init_weights"] = sha256_file(Path(init_dir) / WEIGHTS_FILE)
    settings = {"train": config.model_dump(mode="json"), "model": model_fields,
                "text": recipe.text.model_dump(mode="json"),
                "data": {"media": list(spec.media), "resolution": resolution, "frames": spec.frames,
                         "video_batch_size": spec.video_batch_size},
                "tuning": {"early_stopping_patience": spec.early_stopping_patience,
                           "average_last": spec.average_last}}
    resume = find_resume(stage, recipe, config, settings, inputs, output_dir, held)
    if resume.checkpoint is not None:
        print(f"[{stage}] resuming from step {resume.step} (checkpoint {resume.checkpoint})", file=sys.stderr,
              flush=True)
    tracker.set_tags({f"{stage}.resumed": str(resume.checkpoint is not None).lower(),
                      f"{stage}.resumed_from_step": resume.step,
                      f"{stage}.checkpoint_dir": str(resume.directory or "")})

    batch_sizes = {"image": config.batch_size if "image" in spec.media else 0,
                   "video": spec.video_batch_size if "video" in spec.media else 0}
    # Batches are a function of (seed, step), starting at the resumed step: see StepPlan.
    plan = StepPlan(group_specs(train_groups, config.balanced), batch_sizes, config.seed)
    # Both loaders get their own generator: a DataLoader without one draws its base seed from the
    # global RNG each time it is iterated, so the validation runs inside fit would shift caption
    # dropout and noise, and a resumed run (which skips the validation at its checkpoint step)
    # would diverge from an uninterrupted one.
    val_loader = torch.utils.data.DataLoader(ValidationBatches(val_groups), batch_size=None, shuffle=False,
                                             generator=torch.Generator().manual_seed(config.seed))

    logger = tracking.training_logger(tracker)
    grid_prompts = [p.text for p in load_prompts(recipe.evaluate.prompts, recipe.evaluate.grid_prompts)]
    sampling = {"steps": recipe.evaluate.sampling.steps, "guidance": recipe.evaluate.sampling.guidance,
                "seed": recipe.evaluate.sampling.seed, "solver": recipe.evaluate.sampling.solver}
    generator = TextToImage(module.ema, encoder, {}, {}, codec=codec)
    video = None
    if "video" in spec.media:
        video_group = next(g for g in train_groups if g.media == "video")
        frames, height, width = video_group.shape
        video = {"frames": frames, "height": height, "width": width, "prompts": 4, "fps": recipe.curate.video.fps}
    grids = SampleGridCallback(tracker, generator, grid_prompts, config.sample_every, sampling, stage, video=video)
    interactive = sys.stderr.isatty()
    callbacks: list[lightning.Callback] = [grids] if interactive else [grids, PlainProgress(stage)]
    position_check = DataPositionCheck()
    callbacks.append(position_check)
    averaging = None
    if spec.average_last > 1:
        averaging = WeightAveraging(spec.average_last)
        callbacks.append(averaging)
    stopper = None
    if spec.early_stopping_patience > 0:
        stopper = ResumableEarlyStopping(monitor="val/loss", mode="min", patience=spec.early_stopping_patience,
                                         check_finite=True, verbose=False)
        callbacks.append(stopper)
    checkpointer = None
    if resume.directory is not None:
        checkpointer = PeriodicCheckpoint(resume.directory, config.checkpoint_every, config.keep_checkpoints)
        callbacks.append(checkpointer)
    val_every = config.val_every if 0 < config.val_every <= config.steps else None
    accelerator = _accelerator(config)
    precision = resolve_precision(config.precision)
    tracker.set_tags({f"{stage}.precision": precision, f"{stage}.strategy": config.strategy,
                      f"{stage}.accelerator": accelerator})
    trainer = build_trainer(config, logger=logger, callbacks=callbacks, checkpointing=checkpointer is not None,
                            val_every=val_every, progress_bar=interactive)
    train_loader = step_loader(trainer, train_groups, plan, resume.step, config.seed, position_check)
    started = time.monotonic()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader if val_every else None,
                ckpt_path=resume.checkpoint)
    seconds = time.monotonic() - started
    steps_run = int(trainer.global_step) - resume.step
    stopped_early = stopper is not None and int(trainer.global_step) < config.steps
    # Read before validate(): Lightning resets callback_metrics when a new loop starts.
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    if steps_run == 0 and checkpointer is not None and checkpointer.last_train_loss is not None:
        train_loss = checkpointer.last_train_loss  # resumed at the last step: nothing was trained now
    averaged_steps: list[int] = []
    if averaging is not None:
        averaged, averaged_steps = averaging.averaged()
        if averaged is not None:
            module.ema.load_state_dict(averaged)
            print(f"[{stage}] final weights = mean of the EMA at steps {averaged_steps}", file=sys.stderr, flush=True)
    # A separate trainer: the fit trainer may have validation switched off (limit_val_batches=0).
    validator = lightning.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with _ema_as_model(module):
        validated = validator.validate(module, dataloaders=val_loader, verbose=False)
    val_loss = float(validated[0]["val/loss"]) if validated else float("nan")
    tracker.flush()  # queued training metrics are in MLflow (or the stage fails) before the artifact is written
    images = steps_run * (batch_sizes["image"] + batch_sizes["video"] * spec.frames)
    throughput = images / max(seconds, 1e-9)
    state = {
        "stage": stage,
        "step": int(trainer.global_step),
        "metrics": {"train_loss": train_loss, "val_loss": val_loss, "frames_per_second": throughput},
        "precision": precision,
        "train_samples": train_samples,
        "media": list(spec.media),
        "stopped_early": stopped_early,
        "averaged_steps": averaged_steps,
        **(lineage or {}),
    }
    config_json = {
        "architecture": "dit",
        "model": model_config.to_dict(),
        "latent": codec_dict,
        "text": recipe.text.model_dump(mode="json"),
        "flow": asdict(flow),
        "sampling": recipe.register.sampling.model_dump(mode="json"),
        "training": {stage: config.model_dump(mode="json")},
        "data": settings["data"],
        "recipe": recipe.model_dump(mode="json"),
    }
    weights = {k: v.detach().float().contiguous() for k, v in module.ema.state_dict().items()}
    if codec_weights is not None:  # the artifact carries its decoder: serving needs nothing else
        save_weights(Path(output_dir) / AUTOENCODER_FILE, codec_weights)
    save_model_dir(Path(output_dir), weights, config_json, state)  # state.json last marks it complete
    return TrainResult(Path(output_dir), int(trainer.global_step), train_samples, train_loss, val_loss,
                       seconds, throughput, stopped_early, tuple(averaged_steps))


def step_loader(trainer: Any, groups: list[MediaGroup], plan: Any, start_step: int, seed: int,
                position_check: Any) -> torch.utils.data.DataLoader:
    """The training loader from `start_step` on: batches are a function of (seed, step) and this rank's
    share (StepPlan / StepSampler), so a resumed or distributed run draws exactly the batches it should.

    Re-seeds the global RNG last: set-up code (model loading) leaves it in a different state the
    first time it runs in a process than later (measured: two runs in one process started training
    from different RNG states), which would shift caption dropout and noise.
    """
    sampler = StepSampler(start_step, rank=trainer.global_rank, world_size=trainer.world_size)
    position_check.sampler = sampler
    loader = torch.utils.data.DataLoader(StepDataset(groups, plan), sampler=sampler, batch_size=None,
                                         num_workers=0, generator=torch.Generator().manual_seed(seed))
    lightning.seed_everything(seed + 1, workers=True, verbose=False)
    return loader


def prepared_groups(dataset_dir: Path, media: tuple[str, ...], load: dict[str, Any], codec: Any, codec_id: str,
                    encoder: TextEncoder, output_dir: Path, cache: bool,
                    train_ids: set[str] | None = None) -> tuple[list[MediaGroup], list[MediaGroup], int]:
    """The train and val groups of `media`, latents encoded and captions embedded, through the on-disk caches.

    `load` holds load_groups' shape arguments; `cache=False` encodes latents per run instead of
    caching them. Returns (train groups, val groups, latent cache hits).
    """
    train_groups = load_groups(dataset_dir, "train", media, ids=train_ids, **load)
    val_groups = _validation_groups(dataset_dir, media, load)
    embedder = caption_embedder(encoder, output_dir)
    hits = 0
    for split, groups in (("train", train_groups), ("val", val_groups)):
        hits += encode_groups(groups, codec, dataset_dir=dataset_dir, split=split, codec_id=codec_id,
                              output_dir=output_dir, cache=cache)
        embed_groups(groups, embedder)
    return train_groups, val_groups, hits


def _validation_groups(dataset_dir: Path, media: tuple[str, ...], load: dict[str, Any]) -> list[MediaGroup]:
    """The val split's groups of the stage's media; a media kind with no val samples is left out (noted)."""
    groups: list[MediaGroup] = []
    for kind in media:
        try:
            groups += load_groups(dataset_dir, "val", (kind,), **load)
        except ValueError as error:
            print(f"[data] no {kind} validation samples ({error}); val/loss covers the rest", file=sys.stderr,
                  flush=True)
    if not groups:
        raise ValueError(f"{dataset_dir}: the val split has no {'/'.join(media)} samples; raise curate.val_fraction")
    return groups


@contextlib.contextmanager
def _ema_as_model(module: FlowMatchingModule):
    """Validate the weights that ship (the EMA) rather than the raw training weights."""
    raw = module.model
    module.model = module.ema
    try:
        yield
    finally:
        module.model = raw


def caption_embedder(encoder: TextEncoder, output_dir: Path) -> Any:
    """captions -> TextEmbeddings, through the on-disk text-embedding cache when available."""
    from components.text_cache import TextEmbeddingCache, encoder_identity

    cache = TextEmbeddingCache(cache_root(output_dir).parent / "text", encoder_id=encoder_identity(encoder),
                               max_tokens=encoder.max_tokens)
    return lambda captions: cache.get(captions, encoder)
