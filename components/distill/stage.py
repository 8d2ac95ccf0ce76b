"""Distill: a few-step, guidance-free student from an ensemble of teachers (animated stickers; Meng et al. 2023).

Phase 1 folds classifier-free guidance into the student (one forward pass per step, the scale
an input), phase 2 halves its steps round by round from `distill.teacher_steps` to
`distill.student_steps`; the method and its papers are in :mod:`models.distill`. This module
resolves the teachers, loads the curated latents the way the training stages do
(:mod:`components.train_data`), runs one Lightning fit per phase with the training stages'
Trainer, checkpoints and MLflow logger (:mod:`components.training`), and writes the student as
a Model artifact that :class:`models.generate.TextToImage` samples at its few steps.

Teacher sources (`distill.teachers`): ``tuned`` (this pipeline's quality-tuned model),
``pretrained`` (its pretrained model), a model directory, or a registry URI ``models:/name/version``
(the registered pyfunc's ``model_dir`` artifact is downloaded). All teachers must share the
latent space, the text encoder and the input channels; the student starts from the first.

Resume: every phase checkpoints into its own directory keyed by its settings, the dataset,
the teachers' weights, the weights it starts from and this code (components.checkpoints), so a
re-run continues each phase where it stopped, skips finished ones, and never resumes a
checkpoint of other teachers, data or settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import lightning
import numpy as np
import torch
from PIL import Image

from components import tracking
from components.config import DistillConfig, Recipe
from components.evaluate.prompts import load_prompts
from components.media import sha256_file
from components.storage import code_fingerprint, dataset_hash, sha256_json
from components.train_data import ValidationBatches, codec_fingerprint, group_specs
from components.training import (DataPositionCheck, PlainProgress, _accelerator, build_trainer, configure_torch,
                                 find_resume, load_codec_dir, prepared_groups, step_loader)
from models.checkpoint import WEIGHTS_FILE, load_model_dir, save_model_dir
from models.distill import DistillModule, TeacherEnsemble, frozen_copy, nested_grids, student_from_teacher
from models.dit import DiT, DiTConfig
from models.flow import FlowMatchingConfig
from models.generate import AUTOENCODER_FILE, TextToImage, image_grid, load_codec
from models.hardware import resolve_precision
from models.resume import PeriodicCheckpoint
from models.text_encoder import TextEncoder
from models.training import OptimConfig, StepPlan

STAGE = "distill"
# The student's sampling grid: what TextToImage.sampling_times gives a distilled model (nested uniform grids).
GRID_SCHEDULE = "uniform"
# Code whose edits change what distillation computes: part of every phase's checkpoint key.
DISTILL_CODE = ("models.distill", "components.distill.stage")


@dataclass(frozen=True)
class Teacher:
    """One resolved member of the ensemble."""

    source: str  # as written in the recipe
    weight: float  # normalised: the ensemble's weights sum to 1
    directory: Path
    config: dict[str, Any]
    weights_sha256: str


@dataclass
class PhaseResult:
    """What one phase (guidance distillation or one progressive round) ended with."""

    name: str  # "guidance" or "steps<N>"
    steps: int  # optimiser steps of the phase
    sampling_steps: int  # steps the student samples with after this phase
    train_loss: float
    val_loss: float
    seconds: float
    resumed_from_step: int


@dataclass
class DistillResult:
    """What the distill stage produced."""

    directory: Path
    phases: list[PhaseResult] = field(default_factory=list)
    teachers: list[Teacher] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Teachers


def _model_dir_under(root: Path, source: str) -> Path:
    """The directory below `root` that holds a Model artifact (config.json + model.safetensors)."""
    found = sorted({p.parent for p in Path(root).rglob("config.json") if (p.parent / WEIGHTS_FILE).is_file()})
    if not found:
        raise ValueError(f"teacher {source!r}: no model directory (config.json + {WEIGHTS_FILE}) in what the "
                         "registry returned; was it registered by reelforge (artifacts={'model_dir': ...})?")
    return found[0]


def resolve_teacher_dir(source: str, inputs: Mapping[str, Path | None], download_dir: Path) -> Path:
    """Directory of teacher `source`: 'tuned' / 'pretrained' inputs, a model directory, or models:/ URI (downloaded)."""
    if source in ("tuned", "pretrained"):
        path = inputs.get(source)
        if path is None:
            raise ValueError(f"teacher {source!r}: no {source} model was given (--{source} / inputs['{source}'])")
        return Path(path)
    if source.startswith("models:/"):
        import mlflow

        target = Path(download_dir) / hashlib.sha256(source.encode()).hexdigest()[:16]
        target.mkdir(parents=True, exist_ok=True)
        try:
            # Explicit URIs: no process-wide mlflow.set_tracking_uri state (it would pin later runs in this process).
            uri = tracking.tracking_uri()
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=uri,
                                                        registry_uri=uri)
        except Exception as error:  # noqa: BLE001 - re-raised with the teacher named
            raise ValueError(f"teacher {source!r}: could not download it from the MLflow registry: {error}") from error
        return _model_dir_under(Path(local), source)
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"teacher {source!r} is not 'tuned', 'pretrained', a models:/ URI or an existing directory")
    return path


def load_teachers(config: DistillConfig, inputs: Mapping[str, Path | None], download_dir: Path) -> list[Teacher]:
    """Resolve and check every teacher: a flow-matching DiT with the first one's latent space, text encoder and
    input channels (the student reads one latent space and one caption embedding)."""
    total = sum(t.weight for t in config.teachers)
    teachers: list[Teacher] = []
    for entry in config.teachers:
        directory = resolve_teacher_dir(entry.source, inputs, download_dir)
        config_file = directory / "config.json"
        if not config_file.is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ValueError(f"teacher {entry.source!r}: {directory} is not a model directory "
                             f"(config.json and {WEIGHTS_FILE} expected)")
        model_config = json.loads(config_file.read_text(encoding="utf-8"))
        if model_config.get("architecture", "dit") != "dit" or "model" not in model_config:
            raise ValueError(f"teacher {entry.source!r}: {directory} is not a text-to-image DiT model")
        if model_config["model"].get("guidance_embed"):
            raise ValueError(f"teacher {entry.source!r}: {directory} is already a distilled student; teachers must "
                             "be classifier-free-guidance models")
        teachers.append(Teacher(entry.source, entry.weight / total, directory, model_config,
                                sha256_file(directory / WEIGHTS_FILE)))
    first = teachers[0]
    for teacher in teachers[1:]:
        for key, what in (("latent", "latent space"), ("text", "text encoder")):
            if _comparable(teacher.config.get(key)) != _comparable(first.config.get(key)):
                raise ValueError(f"teacher {teacher.source!r} ({teacher.directory}) has another {what} than teacher "
                                 f"{first.source!r}: {teacher.config.get(key)} vs {first.config.get(key)}")
        channels = (teacher.config["model"].get("in_channels"), first.config["model"].get("in_channels"))
        if channels[0] != channels[1]:
            raise ValueError(f"teacher {teacher.source!r} ({teacher.directory}) has in_channels {channels[0]}, "
                             f"teacher {first.source!r} {channels[1]}")
    return teachers


def _comparable(section: Any) -> Any:
    """A config section for equality checks (the pixel codec may be written as {} or {'kind': 'pixel'})."""
    if not section or (isinstance(section, dict) and section.get("kind", "pixel") == "pixel" and len(section) <= 1):
        return {"kind": "pixel"}
    return section


def _load_dit(directory: Path) -> DiT:
    weights, config, _ = load_model_dir(directory)
    model = DiT(DiTConfig.from_dict(config["model"]))
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and bytes (identifies a phase's starting weights)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The stage


def run(recipe: Recipe, dataset_dir: Path, inputs: Mapping[str, Path | None], output_dir: Path,
        tracker: tracking.StageTracker, autoencoder_dir: Path | None = None) -> DistillResult:
    """Distil the teachers of `recipe.distill` into a few-step student and write its Model artifact.

    `inputs` maps 'tuned' (and optionally 'pretrained') to model directories for the teacher
    sources of the same names. `autoencoder_dir` is the autoencoder stage's output (None: the
    first teacher's own latent space, read from its directory).
    """
    with contextlib.ExitStack() as held:  # phase checkpoint locks and downloaded teachers, until the end
        download_dir = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="reelforge-teachers-")))
        return _run(recipe, Path(dataset_dir), inputs, Path(output_dir), tracker, autoencoder_dir, download_dir, held)


def _run(recipe: Recipe, dataset_dir: Path, inputs: Mapping[str, Path | None], output_dir: Path,
         tracker: tracking.StageTracker, autoencoder_dir: Path | None, download_dir: Path,
         held: contextlib.ExitStack) -> DistillResult:
    config = recipe.distill
    started = time.monotonic()
    configure_torch(config.threads)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    teachers = load_teachers(config, inputs, download_dir)
    first = teachers[0]
    teacher_config = DiTConfig.from_dict(first.config["model"])

    # --- latent space: the autoencoder input when given (it must be the teachers'), else the first teacher's own
    if autoencoder_dir is not None:
        codec, codec_dict, codec_weights = load_codec_dir(Path(autoencoder_dir))
        if _comparable(codec_dict) != _comparable(first.config.get("latent")):
            raise ValueError(f"the autoencoder input {autoencoder_dir} is not the latent space teacher "
                             f"{first.source!r} was trained in: {codec_dict} vs {first.config.get('latent')}")
        codec_id = codec_fingerprint(Path(autoencoder_dir) if codec_weights is not None else None)
    else:
        codec = load_codec(first.directory, first.config)
        codec_dict = first.config.get("latent") or {"kind": "pixel"}
        ae_file = first.directory / AUTOENCODER_FILE
        codec_id = sha256_file(ae_file) if _comparable(codec_dict) != {"kind": "pixel"} else "pixel"
    if codec.channels != teacher_config.in_channels:
        raise ValueError(f"the latent space has {codec.channels} channels but teacher {first.source!r} expects "
                         f"{teacher_config.in_channels}")

    # --- data: the curated train images as latents with caption embeddings (cached, like the training stages)
    text_section = first.config["text"]
    encoder = TextEncoder(model_path=text_section.get("model_path"), max_tokens=int(text_section["max_tokens"]))
    if encoder.dim != teacher_config.text_dim:
        raise ValueError(f"the text encoder gives {encoder.dim}-dim embeddings but teacher {first.source!r} "
                         f"expects text_dim {teacher_config.text_dim}")
    load = dict(resolution=recipe.curate.resolution, curated_resolution=recipe.curate.resolution,
                multiple=codec.spatial_downsample * teacher_config.patch_size, frames=1)
    train_groups, val_groups, hits = prepared_groups(dataset_dir, ("image",), load, codec, codec_id, encoder,
                                                     output_dir, cache=config.precompute_latents)
    train_ids = [i for g in train_groups for i in g.ids]
    null_text = encoder.encode([""])

    # --- student and phases
    student_config, student_weights = student_from_teacher(
        teacher_config, load_model_dir(first.directory)[0], config.student_depth, seed=config.seed)
    grids = nested_grids(config.teacher_steps, config.student_steps, GRID_SCHEDULE)
    ensemble = TeacherEnsemble([_load_dit(t.directory) for t in teachers], [t.weight for t in teachers], null_text)
    guidance_range = (config.guidance_min, config.guidance_max)
    optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
                        ema_decay=config.ema_decay, caption_dropout=0.0, grad_clip=config.grad_clip)
    teacher_record = [{"source": t.source, "weight": t.weight, "weights_sha256": t.weights_sha256} for t in teachers]
    base_inputs = {"dataset": dataset_hash(dataset_dir), "train_ids": sha256_json(train_ids), "codec": codec_id,
                   "teachers": teacher_record, "code": code_fingerprint(DISTILL_CODE)}
    tracker.log_params({"distill.rounds_resolved": config.rounds(), "distill.student_depth_resolved":
                        student_config.depth, "distill.teacher_depth": teacher_config.depth,
                        "distill.grid": GRID_SCHEDULE,
                        **{f"distill.teacher_{i}": f"{t.source} (weight {t.weight:.3f}, sha256 {t.weights_sha256[:12]})"
                           for i, t in enumerate(teachers)}})
    tracker.log_metrics({"distill.train_samples": len(train_ids), "distill.latent_cache_hits": hits,
                         "distill.student_parameters": sum(p.numel() for p in student_weights.values()),
                         "distill.teacher_parameters": sum(p.numel() for p in ensemble.teachers[0].parameters())})
    for group in train_groups:
        print(f"[{STAGE}] train {group.describe()}", file=sys.stderr, flush=True)

    phases: list[tuple[str, int, int]] = [("guidance", config.steps, config.teacher_steps)]
    steps = config.teacher_steps // 2
    while steps >= config.student_steps:
        phases.append((f"steps{steps}", config.round_steps, steps))
        steps //= 2
    results: list[PhaseResult] = []
    teacher: Any = ensemble
    for index, (name, optimiser_steps, sampling_steps) in enumerate(phases):
        progressive = name != "guidance"
        module = DistillModule(student_config, student_weights, teacher, "progressive" if progressive else "guidance",
                               grids[sampling_steps], optim, null_text, guidance_range,
                               fine_grid=grids[2 * sampling_steps] if progressive else None, val_seed=config.seed)
        phase_config = config.model_copy(update={"steps": optimiser_steps, "seed": config.seed + index})
        settings = {"train": phase_config.model_dump(mode="json", exclude={"teachers", "round_steps"}),
                    "phase": name, "student": student_config.to_dict(), "grid": grids[sampling_steps].tolist(),
                    "guidance_range": list(guidance_range), "text": text_section}
        phase_inputs = {**base_inputs, "init_weights": weights_digest(student_weights)}
        result = _fit_phase(f"{STAGE}-{name}", module, phase_config, recipe, settings, phase_inputs, train_groups,
                            val_groups, output_dir, tracker, held)
        results.append(PhaseResult(name, optimiser_steps, sampling_steps, **result))
        print(f"[{STAGE}] {name}: train loss {result['train_loss']:.5f}, val loss {result['val_loss']:.5f} "
              f"(student now samples in {sampling_steps} steps)", file=sys.stderr, flush=True)
        student_weights = {k: v.detach().float().cpu().contiguous() for k, v in module.ema.state_dict().items()}
        teacher = frozen_copy(module.ema).cpu()  # the next round distils the EMA of this one
    del ensemble

    # --- the artifact
    student = DiT(student_config)
    student.load_state_dict(student_weights)
    student.eval()
    sampling = {**recipe.register.sampling.model_dump(mode="json"), "steps": config.student_steps,
                "guidance": recipe.evaluate.sampling.guidance}
    final_metrics = {f"{p.name}_train_loss": p.train_loss for p in results}
    final_metrics.update({f"{p.name}_val_loss": p.val_loss for p in results})
    config_json = {
        "architecture": "dit",
        "model": student_config.to_dict(),
        "latent": codec_dict,
        "text": text_section,
        "flow": first.config.get("flow") or asdict(FlowMatchingConfig()),
        "sampling": sampling,
        "distill": {"method": "guidance+progressive", "teacher_steps": config.teacher_steps,
                    "student_steps": config.student_steps, "rounds": config.rounds(), "grid": GRID_SCHEDULE,
                    "teachers": teacher_record, "guidance_range": list(guidance_range),
                    "student_depth": student_config.depth, "teacher_depth": teacher_config.depth},
        "training": {STAGE: config.model_dump(mode="json")},
        "recipe": recipe.model_dump(mode="json"),
    }
    state = {"stage": STAGE, "step": sum(p.steps for p in results), "metrics": final_metrics,
             "phases": [asdict(p) for p in results], "dataset_sha256": base_inputs["dataset"]}
    output_dir.mkdir(parents=True, exist_ok=True)
    if (first.directory / AUTOENCODER_FILE).is_file():  # the artifact carries its decoder: serving needs nothing else
        shutil.copyfile(first.directory / AUTOENCODER_FILE, output_dir / AUTOENCODER_FILE)
    save_model_dir(output_dir, {k: v.contiguous() for k, v in student_weights.items()}, config_json, state)

    # --- student at its steps next to the teacher at teacher_steps: same prompts, same seed
    prompts = [p.text for p in load_prompts(recipe.evaluate.prompts, recipe.evaluate.grid_prompts)]
    seed = recipe.evaluate.sampling.seed
    student_images = TextToImage(student, encoder, config_json, state, codec=codec)(
        prompts, steps=config.student_steps, guidance=sampling["guidance"], seed=seed)
    teacher_generator = TextToImage(_load_dit(first.directory), encoder, first.config, {}, codec=codec)
    teacher_images = teacher_generator(prompts, steps=config.teacher_steps, guidance=sampling["guidance"], seed=seed)
    tracker.log_image(comparison_grid(student_images, teacher_images), "samples/distill_student_vs_teacher.png")
    tracker.flush()
    return DistillResult(output_dir, results, teachers, time.monotonic() - started)


def comparison_grid(student: np.ndarray, teacher: np.ndarray, columns: int = 8) -> Image.Image:
    """Student samples in the top rows, the teacher's for the same prompts and seed below them."""
    top, bottom = image_grid(student, columns=columns, upscale=2), image_grid(teacher, columns=columns, upscale=2)
    return Image.fromarray(np.concatenate([top, np.full((6, top.shape[1], 3), 128, np.uint8), bottom]))


def _fit_phase(name: str, module: DistillModule, config: DistillConfig, recipe: Recipe, settings: dict[str, Any],
               inputs: dict[str, Any], train_groups: list, val_groups: list, output_dir: Path,
               tracker: tracking.StageTracker, held: contextlib.ExitStack) -> dict[str, Any]:
    """One Lightning fit (resumed from this phase's newest checkpoint), then the EMA's validation loss."""
    resume = find_resume(name, recipe, config, settings, inputs, output_dir, held)
    if resume.checkpoint is not None:
        print(f"[{name}] resuming from step {resume.step} (checkpoint {resume.checkpoint})", file=sys.stderr,
              flush=True)
    tracker.set_tags({f"{name}.resumed_from_step": resume.step, f"{name}.checkpoint_dir": str(resume.directory or "")})
    plan = StepPlan(group_specs(train_groups, config.balanced), {"image": config.batch_size}, config.seed)
    val_loader = torch.utils.data.DataLoader(ValidationBatches(val_groups), batch_size=None, shuffle=False,
                                             generator=torch.Generator().manual_seed(config.seed))
    position_check = DataPositionCheck()
    callbacks: list[lightning.Callback] = [position_check]
    interactive = sys.stderr.isatty()
    if not interactive:
        callbacks.append(PlainProgress(name))
    checkpointer = None
    if resume.directory is not None:
        checkpointer = PeriodicCheckpoint(resume.directory, config.checkpoint_every, config.keep_checkpoints)
        callbacks.append(checkpointer)
    trainer = build_trainer(config, logger=tracking.training_logger(tracker), callbacks=callbacks,
                            checkpointing=checkpointer is not None, val_every=None, progress_bar=interactive)
    train_loader = step_loader(trainer, train_groups, plan, resume.step, config.seed, position_check)
    started = time.monotonic()
    trainer.fit(module, train_dataloaders=train_loader, ckpt_path=resume.checkpoint)
    seconds = time.monotonic() - started
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    if int(trainer.global_step) == resume.step and checkpointer is not None and checkpointer.last_train_loss is not None:
        train_loss = checkpointer.last_train_loss  # resumed at the last step: nothing was trained now
    validator = lightning.Trainer(accelerator=_accelerator(config), devices=1, precision=resolve_precision(config.precision),
                                  logger=False, enable_progress_bar=False, enable_model_summary=False,
                                  enable_checkpointing=False)
    validated = validator.validate(module, dataloaders=val_loader, verbose=False)
    val_loss = float(validated[0][f"val/{module.metric_name}_loss"]) if validated else float("nan")
    module.cpu()
    return {"train_loss": train_loss, "val_loss": val_loss, "seconds": seconds, "resumed_from_step": resume.step}


def stage(recipe: Recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: distil `inputs['tuned']` (+ other teachers) into `outputs['model']`."""
    from components.runner import StageOutput

    if inputs.get("tuned") is None:
        raise ValueError("the distill stage needs the quality-tuned model: inputs['tuned'] (--tuned)")
    teacher_inputs = {"tuned": inputs["tuned"], "pretrained": inputs.get("pretrained")}
    result = run(recipe, inputs["dataset"], teacher_inputs, outputs["model"], tracker,
                 autoencoder_dir=inputs.get("autoencoder"))
    config = recipe.distill
    metrics: dict[str, float] = {f"{STAGE}.seconds_training": sum(p.seconds for p in result.phases)}
    for phase in result.phases:
        metrics[f"{STAGE}.{phase.name}.final_train_loss"] = phase.train_loss
        metrics[f"{STAGE}.{phase.name}.val_loss"] = phase.val_loss
        metrics[f"{STAGE}.{phase.name}.train_seconds"] = phase.seconds
    last = result.phases[-1]
    metrics[f"{STAGE}.final_val_loss"] = last.val_loss
    metadata = {"stage": STAGE, "student_steps": config.student_steps, "teacher_steps": config.teacher_steps,
                "rounds": config.rounds(), "teachers": len(result.teachers), "val_loss": last.val_loss,
                "framework": "pytorch-lightning", "format": "safetensors"}
    directory = Path(result.directory)
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[directory / "config.json", directory / "state.json"],
                       tags={f"{STAGE}.method": "guidance+progressive"})
