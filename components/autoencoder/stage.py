"""Autoencoder stage: the latent space the generator trains in (Movie Gen's TAE, Emu's 16-channel VAE).

With `autoencoder.kind: vae` this trains `models.autoencoder` on the curated train split,
images and clips together (an image is a 1-frame video, so one model serves T2I and T2V),
measures reconstruction quality on the val split (PSNR, SSIM, per media kind), logs
side-by-side reconstructions (a PNG grid and an MP4/GIF clip), computes the per-channel
latent statistics that normalise latents for the generator, and writes a Model artifact:
`model.safetensors` (autoencoder weights), `config.json` (`latent`: everything needed to
rebuild the codec) and `state.json`. Training resumes from checkpoints like the generator's.

With `kind: pixel` (the tiniest recipes) it only records that the generator works on pixels,
so every later stage takes the same input either way.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from PIL import Image

from components import tracking
from components.config import Recipe
from components.storage import dataset_hash
from components.train_data import MediaGroup, load_groups
from components.training import PlainProgress, build_trainer, configure_torch, find_resume
from models.checkpoint import save_model_dir
from models.generate import image_grid, to_uint8
from models.hardware import resolve_precision
from models.resume import PeriodicCheckpoint
from models.training import GroupSpec, StepPlan, StepSampler

# How many train samples the latent statistics are computed from (enough for 8-16 channel means).
_STATS_SAMPLES = 512


class _PixelSteps(torch.utils.data.Dataset):
    """Dataset indexed by optimiser step: {"groups": [{"pixels": [B,3,T,H,W] in [-1,1]}, ...]}."""

    def __init__(self, groups: list[MediaGroup], plan: StepPlan) -> None:
        self.groups, self.plan = groups, plan

    def __getitem__(self, step: int) -> dict[str, Any]:
        return {"groups": [{"pixels": self.groups[g].pixels[torch.as_tensor(idx)].float() / 127.5 - 1.0,
                            "media": self.groups[g].media} for g, idx in self.plan.step(step)]}


class _PixelChunks(torch.utils.data.Dataset):
    """Every validation sample once, in chunks of one group each."""

    def __init__(self, groups: list[MediaGroup], chunk: int = 64) -> None:
        self.groups = groups
        self.index = [(g, start) for g, group in enumerate(groups) for start in range(0, len(group.ids), chunk)]
        self.chunk = chunk

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        g, start = self.index[index]
        group = self.groups[g]
        return {"groups": [{"pixels": group.pixels[start:start + self.chunk].float() / 127.5 - 1.0,
                            "media": group.media}]}


def _groups(dataset_dir: Path, split: str, recipe: Recipe, multiple: int) -> list[MediaGroup]:
    """The split's images and (when there are any) clip windows of `autoencoder.frames` frames."""
    load = dict(resolution=recipe.curate.resolution, curated_resolution=recipe.curate.resolution,
                multiple=multiple, frames=recipe.autoencoder.frames)
    groups = load_groups(dataset_dir, split, ("image",), **load)
    if recipe.autoencoder.video_batch_size > 0:
        try:
            groups += load_groups(dataset_dir, split, ("video",), **load)
        except ValueError as error:
            print(f"[autoencoder] {split}: no clips to train on ({error}); images only", file=sys.stderr, flush=True)
    return groups


def _build_module(recipe: Recipe) -> Any:
    """The Lightning module for the recipe's autoencoder."""
    from models.autoencoder import AutoencoderConfig
    from models.autoencoder.training import AutoencoderModule, AutoencoderTrainConfig

    section = recipe.autoencoder
    train_config = AutoencoderTrainConfig(lr=section.lr, weight_decay=section.weight_decay,
                                          warmup_steps=section.warmup_steps, kl_weight=section.kl_weight,
                                          grad_clip=section.grad_clip, seed=section.seed)
    return AutoencoderModule(AutoencoderConfig.from_dict(recipe.autoencoder_config_dict()), train_config)


@torch.no_grad()
def _evaluate(autoencoder: Any, groups: list[MediaGroup]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """PSNR/SSIM of val reconstructions per media kind, and uint8 examples (originals, reconstructions)."""
    from models.autoencoder.metrics import psnr, ssim

    scores: dict[str, list[tuple[float, float, int]]] = {}
    examples: dict[str, np.ndarray] = {}
    autoencoder.eval()
    for group in groups:
        for start in range(0, len(group.ids), 64):
            pixels = group.pixels[start:start + 64].float() / 127.5 - 1.0
            mean, _ = autoencoder.encode(pixels)
            reconstruction = autoencoder.decode(mean).clamp(-1, 1)
            scores.setdefault(group.media, []).append(
                (float(psnr(reconstruction, pixels)), float(ssim(reconstruction, pixels)), pixels.shape[0]))
            if group.media not in examples:
                pair = torch.stack([pixels[:8], reconstruction[:8]], dim=1).flatten(0, 1)  # [16,3,T,H,W]
                examples[group.media] = to_uint8(pair)  # [16,T,H,W,3]
    metrics = {}
    for media, rows in scores.items():
        total = sum(n for _, _, n in rows)
        metrics[f"autoencoder.val_psnr_{media}"] = sum(p * n for p, _, n in rows) / total
        metrics[f"autoencoder.val_ssim_{media}"] = sum(s * n for _, s, n in rows) / total
    return metrics, examples


@torch.no_grad()
def _latent_stats(autoencoder: Any, groups: list[MediaGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel shift/scale of the posterior means of up to _STATS_SAMPLES train samples."""
    from models.latent import latent_stats

    latents = []
    budget = _STATS_SAMPLES
    for group in groups:
        take = min(budget, len(group.ids))
        for start in range(0, take, 64):
            pixels = group.pixels[start:min(start + 64, take)].float() / 127.5 - 1.0
            mean, _ = autoencoder.encode(pixels)
            latents.append(mean.transpose(0, 1).flatten(1))  # [C, b*T*h*w]
        budget -= take
        if budget <= 0:
            break
    flat = torch.cat(latents, dim=1)  # [C, n]
    return latent_stats(flat.transpose(0, 1)[:, :, None, None, None])


def run(recipe: Recipe, dataset_dir: Path, output_dir: Path, tracker: tracking.StageTracker) -> dict[str, Any]:
    """Train (or record) the latent space and write its Model artifact; returns the metrics."""
    from models.latent import AutoencoderCodec, PixelCodec

    output_dir = Path(output_dir)
    section = recipe.autoencoder
    if section.kind == "pixel":
        save_model_dir(output_dir, {}, {"architecture": "pixel", "latent": PixelCodec().to_dict()},
                       {"stage": "autoencoder", "kind": "pixel"})
        return {"autoencoder.pixel_space": 1.0}

    with contextlib.ExitStack() as held:
        configure_torch(section.threads)
        lightning.seed_everything(section.seed, workers=True, verbose=False)
        module = _build_module(recipe)
        spatial = module.model.config.spatial_downsample
        train_groups = _groups(Path(dataset_dir), "train", recipe, spatial)
        val_groups = _groups(Path(dataset_dir), "val", recipe, spatial)
        for group in train_groups:
            print(f"[autoencoder] train {group.describe()}", file=sys.stderr, flush=True)
        specs = [GroupSpec(g.media, len(g.ids)) for g in train_groups]
        media = {g.media for g in train_groups}
        batch_sizes = {"image": section.batch_size,
                       "video": section.video_batch_size if "video" in media else 0}
        plan = StepPlan(specs, batch_sizes, section.seed)
        settings = {"autoencoder": section.model_dump(mode="json"), "model": recipe.autoencoder_config_dict()}
        inputs = {"dataset": dataset_hash(dataset_dir)}
        resume = find_resume("autoencoder", recipe, section, settings, inputs, output_dir, held)
        if resume.checkpoint is not None:
            print(f"[autoencoder] resuming from step {resume.step}", file=sys.stderr, flush=True)
        tracker.set_tags({"autoencoder.resumed_from_step": resume.step})
        val_loader = torch.utils.data.DataLoader(_PixelChunks(val_groups), batch_size=None, shuffle=False)
        callbacks: list[lightning.Callback] = [] if sys.stderr.isatty() else [PlainProgress("autoencoder")]
        checkpointer = None
        if resume.directory is not None:
            checkpointer = PeriodicCheckpoint(resume.directory, section.checkpoint_every, section.keep_checkpoints)
            callbacks.append(checkpointer)
        val_every = section.val_every if 0 < section.val_every <= section.steps else None
        precision = resolve_precision(section.precision)
        logger = tracking.training_logger(tracker)
        trainer = build_trainer(section, logger=logger, callbacks=callbacks, checkpointing=checkpointer is not None,
                                val_every=val_every, progress_bar=sys.stderr.isatty())
        sampler = StepSampler(resume.step, rank=trainer.global_rank, world_size=trainer.world_size)
        train_loader = torch.utils.data.DataLoader(_PixelSteps(train_groups, plan), sampler=sampler, batch_size=None,
                                                   generator=torch.Generator().manual_seed(section.seed))
        lightning.seed_everything(section.seed + 1, workers=True, verbose=False)
        started = time.monotonic()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader if val_every else None,
                    ckpt_path=resume.checkpoint)
        seconds = time.monotonic() - started
        autoencoder = module.model.float().cpu()
        metrics, examples = _evaluate(autoencoder, val_groups)
        held_out = {g.media for g in val_groups}
        train_only = [g for g in train_groups if g.media not in held_out]
        if train_only:  # e.g. a handful of source videos, none of which landed in the val split
            seen, seen_examples = _evaluate(autoencoder, train_only)
            print(f"[autoencoder] no held-out {'/'.join(sorted({g.media for g in train_only}))}: reconstruction "
                  "metrics for it are measured on training samples (train_psnr_*)", file=sys.stderr, flush=True)
            metrics.update({k.replace(".val_", ".train_"): v for k, v in seen.items()})
            examples.update(seen_examples)
        shift, scale = _latent_stats(autoencoder, train_groups)
        codec = AutoencoderCodec(autoencoder, shift, scale)
        steps_run = int(trainer.global_step) - resume.step
        metrics.update({"autoencoder.train_seconds": seconds, "autoencoder.steps": float(trainer.global_step),
                        "autoencoder.steps_per_second": steps_run / max(seconds, 1e-9),
                        "autoencoder.parameters": float(sum(p.numel() for p in autoencoder.parameters()))})
        for media, frames in examples.items():  # rows: original, reconstruction, original, ...
            if media == "image":
                grid = image_grid(frames[:, 0], columns=8, upscale=2)
                tracker.log_image(Image.fromarray(grid), "reconstructions/images.png")
            else:
                tracker.log_video(frames[:8], "reconstructions/video", fps=recipe.curate.video.fps)
        tracker.flush()
        config = {"architecture": "autoencoder", "latent": codec.to_dict(),
                  "training": {"autoencoder": section.model_dump(mode="json")},
                  "recipe": recipe.model_dump(mode="json")}
        state = {"stage": "autoencoder", "step": int(trainer.global_step), "metrics": metrics,
                 "dataset_sha256": dataset_hash(dataset_dir), "precision": precision}
        weights = {k: v.detach().float().contiguous() for k, v in autoencoder.state_dict().items()}
        save_model_dir(output_dir, weights, config, state)
    return metrics


def stage(recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: `inputs['dataset']` -> `outputs['autoencoder']`."""
    from components.runner import StageOutput

    output = Path(outputs["autoencoder"])
    metrics = run(recipe, inputs["dataset"], output, tracker)
    metadata = {"stage": "autoencoder", "kind": recipe.autoencoder.kind, "format": "safetensors",
                **{k.removeprefix("autoencoder."): v for k, v in metrics.items() if "_psnr_" in k or "_ssim_" in k}}
    return StageOutput(metadata=metadata, metrics=metrics, artifacts=[output / "config.json", output / "state.json"])
