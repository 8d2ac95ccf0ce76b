"""Evaluate: the untrained floor, the pretrained, the quality-tuned (teacher), the distilled student and
the registry's current champion side by side on fixed prompt sets.

Models (``models`` in metrics.json, in this order):
- ``untrained``: a freshly initialised DiT of the tuned model's architecture behind the same codec
  (adaLN-zero predicts zero velocity, so its samples are the decoded starting noise): the floor.
- ``pretrained``, ``tuned``: sampled at ``evaluate.sampling`` (steps, classifier-free guidance).
- ``student``: the distilled model, at its own few steps (its config.json), the guidance scale fed
  as an input (one forward pass per step).
- ``champion``: the version under ``models:/<register.model_name>@<register.champion_alias>``
  (or a directory given as input); a distilled champion also runs at its own steps. No registry
  or no champion: skipped, and metrics.json says why under ``champion``.
Each model's ``steps`` and ``guidance`` are in its metrics. Every model answers the same prompts
with the same seed per prompt (seed + prompt index), so images pair up for A/B.

Metrics on the main prompt set (``evaluate.prompts``, default ``demo``):
- alignment: retrieval-based text-image alignment (no CLIP offline): mean MiniLM similarity
  between the prompt and the captions of the k nearest real images in EfficientNet feature
  space; reported with a 95% interval, next to its chance floor and the real-image ceiling.
- aesthetic: the curation's aesthetic scorer (``curate.aesthetic``), with a 95% interval.
- category_accuracy: k-NN category vote of each image vs the prompt's category.
- fid / kid: Frechet and kernel (KID) distance to the held-out real images in
  EfficientNet-Lite0 features. NOT Inception-FID: same formulas, another feature space, so
  compare models within one run, never with published FID numbers. With a few hundred images
  both are biased upwards.
- realism: cosine similarity of each image to its nearest real image in features; diversity:
  mean pairwise feature distance; technical_quality: the curation score (reference only: noise
  is sharp and colourful and scores high on it).
- latency_ms (median ms per image in a batch of 8), latency_single_ms (one prompt),
  throughput_images_per_s (batched), all at the model's own steps, after warm-up.
- video_frame_change (a generator trained on clips): mean absolute change between frames.

Extra prompt sets (``evaluate.extra_prompt_sets``, default VBench's prompts, capped per set):
aesthetic (95% interval) and diversity per model, overall and per category (VBench: a prompt's
first dimension); the reference-based metrics need the main set's categories and are not computed.

A/B (``ab``): the student against the champion (the promotion gate's figure), the student
against its teacher (tuned), and tuned against pretrained (Emu's win-rate claim), judged per
prompt by :func:`components.evaluate.metrics.pairwise_win_rate` (alignment and aesthetic,
rank-normalised, equal weight; ties = half a win), with a 95% Wilson interval.

metrics.json (the register stage reads ``gate_inputs``; these keys are a contract):
  models:       {name: {metric: float, ..., "steps", "guidance"}} for untrained/pretrained/tuned/student/champion
  comparisons:  {"tuned_minus_pretrained.<m>": float, "check.*": 0/1 and intervals}
  ab:           {"student_vs_champion" | "student_vs_tuned" | "tuned_vs_pretrained":
                 {"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses"}}  (pairs with a missing model left out)
  gate_inputs:  {"candidate": "student", "alignment", "aesthetic", "fid", "latency_ms",
                 "win_rate_vs_champion" (null without a champion), "win_rate_ci_low" (null likewise)}
  champion:     {"status": "evaluated", "source", "version"?} or {"status": "none", "reason"}
  prompt_sets:  {set: {"prompts": n, "models": {name: {"aesthetic", "aesthetic_ci_low", "aesthetic_ci_high",
                 "diversity", "categories": {category: {"n", "aesthetic", "diversity"?}}}}}}
  context, lineage, judge, clips, per_prompt, prompts
Files: metrics.json, report.html, model_card.md, model_card.html, grids/<model>.png.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.config import AestheticConfig, EvaluateConfig, Recipe
from components.curate.aesthetic import AestheticScorer, LearnedAestheticScorer, load_aesthetic_scorer
from components.curate.scorers import FEATURE_SIDE as CURATION_FEATURE_SIDE
from components.evaluate.metrics import (
    JUDGE_METRICS,
    caption_alignment_chance,
    compare_paired,
    diversity,
    frame_change,
    frechet_distance,
    kernel_inception_distance,
    knn_caption_alignment,
    knn_category_accuracy,
    mean_confidence_interval,
    pairwise_win_rate,
    realism,
)
from components.evaluate.metrics import HEADLINE_METRICS as HEADLINE
from components.evaluate.prompts import Prompt, load_prompts, spread
from components.media import technical_quality
from components.storage import dataset_hash
from components.training import configure_torch, embed, load_split
from models.dit import build
from models.generate import TextToImage, image_grid, to_uint8
from models.hardware import autocast_dtype, resolve_precision
from models.text_encoder import TextEncoder
from models.vision_features import ImageFeatureExtractor

# Name of the untrained floor in results, grids and metric keys.
UNTRAINED = "untrained"
# The order models are evaluated and shown in (floor first, the champion last).
MODEL_ORDER = (UNTRAINED, "pretrained", "tuned", "student", "champion")
# Clips generated for the video metric and the logged clip grid (each costs frames/1 images).
VIDEO_PROMPTS = 4
# (winner, loser, metric): the claims issue 4 makes about the three models.
CHECKS = (("tuned", "pretrained", "aesthetic"), ("pretrained", UNTRAINED, "alignment"),
          ("tuned", UNTRAINED, "alignment"))
# (candidate, baseline) A/B pairs: the gate's figure first, then the distillation and quality-tuning claims.
AB_PAIRS = (("student", "champion"), ("student", "tuned"), ("tuned", "pretrained"))
# How the A/B judge decides, as written into metrics.json and the model card.
JUDGE = (f"per prompt (same seed), the image with the higher mean of its rank-normalised {' and '.join(JUDGE_METRICS)} "
         "scores (both models' scores ranked together) wins; equal scores tie and count as half a win; "
         "95% Wilson interval on the win rate")


@dataclass(frozen=True)
class Reference:
    """Real images the generated ones are compared with."""

    features: np.ndarray  # all curated images (retrieval reference)
    caption_embeddings: np.ndarray
    categories: list[str]
    holdout_features: np.ndarray  # val split only (distribution reference for FD/KID)


@dataclass(frozen=True)
class Scored:
    """One model's metrics (floats) and the per-prompt scores the comparisons pair up."""

    metrics: dict[str, float]
    per_prompt: dict[str, np.ndarray]  # "alignment", "aesthetic": [N] each


def _reference(dataset_dir: Path, encoder: TextEncoder, extractor: ImageFeatureExtractor) -> tuple[Reference, dict]:
    train = load_split(dataset_dir, "train")
    val = load_split(dataset_dir, "val")
    feats_train = extractor.features(train.images).numpy()
    feats_val = extractor.features(val.images).numpy()
    captions = embed(encoder, train.captions + val.captions).pooled.numpy()
    everything = np.concatenate([feats_train, feats_val])
    # FD/KID need at least two real images: a small dataset (e.g. the new files of a retraining run)
    # may hold out fewer, and then every real image is the distribution reference.
    holdout = feats_val if len(feats_val) >= 2 else everything
    reference = Reference(everything, captions, train.categories + val.categories, holdout)
    # Ceiling: real held-out images retrieved against the train images and scored with their own captions.
    ceiling = knn_caption_alignment(feats_val, captions[len(train.captions):], feats_train,
                                    captions[: len(train.captions)])
    return reference, {"alignment_ceiling_real_images": float(ceiling.mean()),
                       "distribution_reference_images": float(len(holdout))}


def score_images(images: torch.Tensor, prompts: list[Prompt], prompt_embeddings: np.ndarray,
                 reference: Reference, extractor: ImageFeatureExtractor, knn: int,
                 aesthetic: AestheticScorer | None = None) -> Scored:
    """All metrics for one set of generated images ([B,C,H,W] in [-1,1]), one per prompt.

    `aesthetic` adds the aesthetic score (skipped when None), see :func:`aesthetic_scores`.
    """
    feats = extractor.features(images).numpy()
    alignment = knn_caption_alignment(feats, prompt_embeddings, reference.features, reference.caption_embeddings, knn)
    mean, low, high = mean_confidence_interval(alignment)
    kid_size = min(len(feats), len(reference.holdout_features))
    kid_mean, _ = kernel_inception_distance(feats, reference.holdout_features, subsets=20, subset_size=max(2, kid_size))
    pixels = to_uint8(images)
    quality = [technical_quality(image)["quality"] for image in pixels]
    metrics = {
        "alignment": mean,
        "alignment_ci_low": low,
        "alignment_ci_high": high,
        "category_accuracy": knn_category_accuracy(feats, [p.category for p in prompts], reference.features,
                                                   reference.categories, knn),
        "fid": frechet_distance(feats, reference.holdout_features),
        "kid": kid_mean,
        "realism": float(realism(feats, reference.features).mean()),
        "technical_quality": float(np.mean(quality)),
        "diversity": diversity(feats),
    }
    per_prompt = {"alignment": alignment}
    if aesthetic is not None:
        scores = aesthetic_scores(images, pixels, feats, extractor, aesthetic)
        metrics["aesthetic"], metrics["aesthetic_ci_low"], metrics["aesthetic_ci_high"] = \
            mean_confidence_interval(scores)
        per_prompt["aesthetic"] = scores
    return Scored(metrics, per_prompt)


def aesthetic_scores(images: torch.Tensor, pixels: np.ndarray, feats: np.ndarray, extractor: ImageFeatureExtractor,
                     aesthetic: AestheticScorer) -> np.ndarray:
    """Per-image aesthetic scores. A head trained on review labels reads EfficientNet features at
    the curation's 128 px; when `extractor` embeds at another size, the images are embedded again."""
    if isinstance(aesthetic, LearnedAestheticScorer) and extractor.input_size != CURATION_FEATURE_SIDE:
        feats = ImageFeatureExtractor(input_size=CURATION_FEATURE_SIDE).features(images).numpy()
    return np.asarray(aesthetic.score(list(pixels), feats), dtype=np.float64)


def score_prompt_set(images: torch.Tensor, prompts: list[Prompt], extractor: ImageFeatureExtractor,
                     aesthetic: AestheticScorer) -> dict[str, Any]:
    """Reference-free metrics of one model on an extra prompt set: aesthetic (95% interval) and
    diversity, overall and per category (``categories``: {category: {"n", "aesthetic", "diversity"}};
    diversity needs two images, so a category with one prompt has none)."""
    feats = extractor.features(images).numpy()
    scores = aesthetic_scores(images, to_uint8(images), feats, extractor, aesthetic)
    mean, low, high = mean_confidence_interval(scores)
    out: dict[str, Any] = {"aesthetic": mean, "aesthetic_ci_low": low, "aesthetic_ci_high": high,
                           "diversity": diversity(feats) if len(feats) > 1 else None, "categories": {}}
    for category in dict.fromkeys(p.category for p in prompts):
        rows = [i for i, p in enumerate(prompts) if p.category == category]
        entry = {"n": len(rows), "aesthetic": float(scores[rows].mean())}
        if len(rows) > 1:
            entry["diversity"] = diversity(feats[rows])
        out["categories"][category] = entry
    return out


def untrained_like(generator: TextToImage, seed: int = 0) -> TextToImage:
    """A freshly initialised DiT of `generator`'s architecture behind the same codec and text encoder.

    adaLN-zero initialisation zeroes the output layer, so it predicts zero velocity and its
    samples are the decoded starting noise: the floor a trained model must beat.
    """
    torch.manual_seed(seed)
    model = build(generator.model.config).eval()
    config = {**generator.config, "untrained": True}
    return TextToImage(model, generator.text_encoder, config, {"step": 0}, codec=generator.codec)


def clip_frames(config: dict[str, Any]) -> int | None:
    """Frames per clip the generator of a model directory's `config.json` trained on; None = images only.

    The model's own training data decides first (``data.media`` has "video": its ``data.frames``);
    otherwise a pretraining stage of its recipe with media video or joint (the last one's frames),
    since quality-tuning on images keeps what the joint stage learned.
    """
    data = config.get("data") or {}
    if "video" in (data.get("media") or []):
        return int(data["frames"])
    stages = ((config.get("recipe") or {}).get("pretrain") or {}).get("stages") or []
    video = [s for s in stages if s.get("media") in ("video", "joint")]
    return int(video[-1].get("frames", 9)) if video else None


def comparisons(results: dict[str, dict[str, float]], per_prompt: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """The figures issue 4 asks for, as flat float metrics.

    - ``tuned_minus_pretrained.<m>`` for each headline metric both models have (plain
      difference: positive is better for higher-is-better metrics, worse for fd/kid/latency).
    - For each of :data:`CHECKS` ("A beats B on M"): ``check.A_beats_B_M`` = 1 when A's mean is
      higher, ``.ci_overlap`` = 1 when their 95% intervals overlap (the win is within noise),
      ``.significant`` = 1 when the paired 95% interval of the per-prompt difference is above 0,
      and ``.difference`` with ``.difference_ci_low`` / ``.difference_ci_high``.
    Checks whose models or metric are missing are left out.
    """
    out: dict[str, float] = {}
    if "tuned" in results and "pretrained" in results:
        for metric in HEADLINE:
            if metric in results["tuned"] and metric in results["pretrained"]:
                out[f"tuned_minus_pretrained.{metric}"] = results["tuned"][metric] - results["pretrained"][metric]
    for winner, loser, metric in CHECKS:
        if metric not in per_prompt.get(winner, {}) or metric not in per_prompt.get(loser, {}):
            continue
        key = f"check.{winner}_beats_{loser}_{metric}"
        compared = compare_paired(per_prompt[winner][metric], per_prompt[loser][metric])
        out[key] = compared.pop("wins")
        out.update({f"{key}.{name}": value for name, value in compared.items()})
    return out


def measure_latency(generator: TextToImage, prompts: list[str], sampling: dict[str, Any], batch: int = 8,
                    repeats: int = 3) -> tuple[float, float]:
    """Median ms per image for a batch of `batch` prompts and for a single prompt, after warm-up.

    Measured on fixed small batches (not the whole evaluation set) so the first model timed
    does not pay one-off allocation costs that the second one skips.
    """
    results = []
    for size in (min(batch, len(prompts)), 1):
        subset = prompts[:size]
        generator.generate_tensor(subset, **sampling)  # warm-up at this batch size
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            generator.generate_tensor(subset, **sampling)
            timings.append((time.perf_counter() - started) * 1000 / size)
        results.append(float(np.median(timings)))
    return results[0], results[1]


def model_sampling(generator: TextToImage, config: EvaluateConfig) -> dict[str, Any]:
    """Steps, guidance and solver a model is evaluated at.

    A distilled model (guidance embedded) runs at its own few steps from its config.json, since
    that is how it is served; every other model at ``evaluate.sampling.steps``. All use the same
    guidance scale (the student takes it as an input, the others apply it as CFG), so the student
    is compared with its teacher at the scale it was distilled to reproduce.
    """
    steps = generator.default_steps if generator.distilled else config.sampling.steps
    return {"steps": int(steps), "guidance": float(config.sampling.guidance), "solver": config.sampling.solver}


def ab_results(per_prompt: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float | int]]:
    """Win rates for :data:`AB_PAIRS` whose two models were both evaluated (key ``<candidate>_vs_<baseline>``)."""
    out: dict[str, dict[str, float | int]] = {}
    for candidate, baseline in AB_PAIRS:
        if candidate in per_prompt and baseline in per_prompt:
            result = pairwise_win_rate(per_prompt[candidate], per_prompt[baseline])
            out[f"{candidate}_vs_{baseline}"] = {k: int(v) if k in ("n", "wins", "ties", "losses") else v
                                                 for k, v in result.items()}
    return out


def gate_inputs(results: dict[str, dict[str, float]], ab: dict[str, dict[str, float | int]]) -> dict[str, Any]:
    """The figures the promotion gate reads (a contract with the register stage: keys stay).

    The candidate is the student when one was evaluated (the deployable model), else the tuned
    model. ``win_rate_vs_champion`` / ``win_rate_ci_low`` are None without a champion.
    """
    candidate = "student" if "student" in results else "tuned" if "tuned" in results else None
    values = results.get(candidate, {}) if candidate else {}
    versus = ab.get(f"{candidate}_vs_champion")
    return {
        "candidate": candidate,
        **{metric: values.get(metric) for metric in ("alignment", "aesthetic", "fid", "latency_ms")},
        "win_rate_vs_champion": versus["win_rate"] if versus else None,
        "win_rate_ci_low": versus["ci_low"] if versus else None,
    }


def model_lineage(directory: Path) -> dict[str, Any]:
    """What a model directory says about how it was made: stage and step (state.json), the
    recipe name, and for a distilled student its ``distill`` section (teacher ensemble, steps)."""
    directory = Path(directory)
    state = _read_json(directory / "state.json")
    config = _read_json(directory / "config.json")
    out: dict[str, Any] = {"stage": state.get("stage"), "step": state.get("step"),
                           "recipe": (config.get("recipe") or {}).get("name")}
    if config.get("distill"):
        out["distill"] = config["distill"]
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return value if isinstance(value, dict) else {}


def find_model_dir(root: Path) -> Path:
    """The model directory inside a downloaded registry artifact: the shallowest folder with
    config.json and model.safetensors (the pyfunc keeps it under ``artifacts/model_dir``)."""
    root = Path(root)
    found = sorted((p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file()),
                   key=lambda p: (len(p.relative_to(root).parts), str(p)))
    if not found:
        raise FileNotFoundError(f"{root}: no model directory (config.json + model.safetensors) in the downloaded "
                                "model; was it registered by `reelforge register` (artifact 'model_dir')?")
    return found[0]


def find_champion(model_name: str, alias: str, destination: Path) -> tuple[Path | None, dict[str, Any]]:
    """Download the version under ``models:/<model_name>@<alias>`` into `destination`.

    Returns its model directory and a description (``status`` "evaluated", ``source``,
    ``version``), or None and ``{"status": "none", "reason": ...}`` when the registry has no such
    model or alias (the first run of a pipeline), or no tracking URI is configured at all.
    """
    import os

    from mlflow.exceptions import MlflowException

    from components import tracking

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None, {"status": "none", "reason": "no MLflow tracking URI configured, so no registry"}
    client = tracking.client()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, {"status": "none", "reason": f"no version of {model_name!r} has alias {alias!r} ({first_line})"}
    uri = f"models:/{model_name}@{alias}"
    import mlflow.artifacts

    # Explicit URIs, not mlflow.set_tracking_uri: the process-wide setting would outlive this call
    # and pin later fluent calls to this store.
    store = tracking.tracking_uri()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination), tracking_uri=store,
                                                    registry_uri=store)
    except MlflowException as error:
        # The alias exists, so the gate will expect a comparison: fail loudly rather than skip it.
        raise RuntimeError(f"champion {uri} (version {version.version}) could not be downloaded: {error}") from error
    return find_model_dir(Path(local)), {"status": "evaluated", "source": uri, "version": str(version.version),
                                         "run_id": version.run_id or ""}


def _load_generator(directory: Path, encoder: TextEncoder) -> TextToImage:
    """Load a model directory, sharing `encoder` when its text settings match (a champion trained
    by another recipe may use another token budget or encoder: it then loads its own)."""
    text = _read_json(Path(directory) / "config.json").get("text") or {}
    same = int(text.get("max_tokens", encoder.max_tokens)) == encoder.max_tokens and not text.get("model_path")
    return TextToImage.from_dir(directory, text_encoder=encoder if same else None)


def _json_safe(value: Any) -> Any:
    """NaN/Inf (e.g. an interval of one sample) become null: metrics.json stays strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run(config: EvaluateConfig, dataset_dir: Path, models: dict[str, Path], output_dir: Path,
        max_tokens: int, aesthetic: AestheticConfig | None = None, untrained_from: str | None = None,
        video_from: str | None = None, video_fps: float = 8.0, champion: dict[str, Any] | None = None,
        git_commit: str = "unknown", pipeline_run: str = "") -> dict[str, Any]:
    """Evaluate each named model directory and the untrained floor; writes metrics.json (format in
    the module docstring), report.html, model_card.md/.html and grids/<model>.png.

    - `models`: name -> model directory, among pretrained, tuned, student, champion (any subset;
      shown in :data:`MODEL_ORDER`).
    - `aesthetic`: the curation's aesthetic scorer settings (default scorer when None).
    - `untrained_from`: whose architecture and codec the ``untrained`` entry copies (default:
      the first model); it is scored first, so results read floor -> pretrained -> tuned -> ...
    - `video_from`: a model that, if its generator trained on clips (:func:`clip_frames`),
      also makes clips for the first prompts: ``video_frame_change`` in its metrics and
      uint8 [N,T,H,W,3] in ``clips_<name>.npy`` (played back at `video_fps`).
    - `champion`: how the champion was found (or why there is none), copied to metrics.json.
    - `git_commit`, `pipeline_run`: lineage for the model card.
    """
    configure_torch(0)
    output_dir = Path(output_dir)
    (output_dir / "grids").mkdir(parents=True, exist_ok=True)
    unknown = set(models) - set(MODEL_ORDER)
    if unknown:
        raise ValueError(f"unknown model names {sorted(unknown)}; expected some of {list(MODEL_ORDER[1:])}")
    models = {name: Path(models[name]) for name in MODEL_ORDER if name in models}
    if not models:
        raise ValueError("no model to evaluate")
    prompts = load_prompts(config.prompts, config.max_prompts)
    extra_sets = {name: load_prompts(name, config.max_extra_prompts) for name in config.extra_prompt_sets}
    texts = [p.text for p in prompts]
    seeds = [config.sampling.seed + index for index in range(len(prompts))]  # same seed per prompt for every model
    encoder = TextEncoder(max_tokens=max_tokens)
    extractor = ImageFeatureExtractor(input_size=config.feature_resolution)
    scorer = load_aesthetic_scorer(aesthetic or AestheticConfig())
    reference, context = _reference(Path(dataset_dir), encoder, extractor)
    prompt_embeddings = encoder.encode(texts)
    pooled = prompt_embeddings.pooled.numpy()
    context["alignment_chance_floor"] = float(caption_alignment_chance(pooled, reference.caption_embeddings).mean())
    context["prompts"] = len(prompts)
    context["prompt_set"] = config.prompts
    context["aesthetic_scorer"] = scorer.name
    context["fid_features"] = f"EfficientNet-Lite0 at {config.feature_resolution} px (not Inception: not comparable " \
                              "with published FID/KID)"
    # bf16 sampling where the hardware runs it fast (it scored the same as fp32 where measured).
    dtype = autocast_dtype(resolve_precision("auto"))
    grid_index = [prompts.index(p) for p in spread(prompts, config.grid_prompts)]

    generators = {}
    for name, directory in models.items():
        try:
            generators[name] = _load_generator(directory, encoder)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name} model {directory} could not be loaded ({type(error).__name__}: {error})") \
                from error
    untrained_from = untrained_from or list(models)[0]
    if untrained_from not in generators:
        raise ValueError(f"untrained_from {untrained_from!r} is not one of the evaluated models {sorted(models)}")
    generators = {UNTRAINED: untrained_like(generators[untrained_from], config.sampling.seed), **generators}

    results: dict[str, dict[str, float]] = {}
    per_prompt: dict[str, dict[str, np.ndarray]] = {}
    grid_images: dict[str, np.ndarray] = {}
    clips: dict[str, dict[str, Any]] = {}
    prompt_sets: dict[str, dict[str, Any]] = {name: {"prompts": len(items), "models": {}}
                                              for name, items in extra_sets.items()}
    for name, generator in generators.items():
        sampling = {**model_sampling(generator, config), "autocast_dtype": dtype}
        images = generator.generate_tensor(texts, seed=seeds, **sampling)
        batched_ms, single_ms = measure_latency(generator, texts, {**sampling, "seed": config.sampling.seed},
                                                repeats=config.latency_repeats)
        scored = score_images(images, prompts, pooled, reference, extractor, config.knn, scorer)
        results[name] = {**scored.metrics, "latency_ms": batched_ms, "latency_single_ms": single_ms,
                         "throughput_images_per_s": 1000.0 / batched_ms if batched_ms > 0 else float("inf"),
                         "steps": float(sampling["steps"]), "guidance": sampling["guidance"]}
        per_prompt[name] = scored.per_prompt
        grid_images[name] = to_uint8(images[grid_index])
        Image.fromarray(image_grid(grid_images[name], columns=8, upscale=2)).save(output_dir / "grids" / f"{name}.png")
        for set_name, set_prompts in extra_sets.items():
            set_seeds = [config.sampling.seed + index for index in range(len(set_prompts))]
            set_images = generator.generate_tensor([p.text for p in set_prompts], seed=set_seeds, **sampling)
            prompt_sets[set_name]["models"][name] = score_prompt_set(set_images, set_prompts, extractor, scorer)
        frames = clip_frames(generator.config) if name == video_from else None
        if frames is not None and frames > 1:
            clip_prompts = spread(texts, VIDEO_PROMPTS)
            video = to_uint8(generator.generate_tensor(clip_prompts, frames=frames, seed=config.sampling.seed,
                                                       **sampling))  # [N,T,H,W,3]
            results[name]["video_frame_change"] = float(frame_change(video).mean())
            np.save(output_dir / f"clips_{name}.npy", video, allow_pickle=False)
            clips[name] = {"file": f"clips_{name}.npy", "frames": frames, "fps": video_fps, "prompts": clip_prompts}

    ab = ab_results(per_prompt)
    lineage = {
        "dataset_sha256": dataset_hash(Path(dataset_dir)),
        "git_commit": git_commit,
        "pipeline_run": pipeline_run,
        "models": {name: {"dir": str(directory), **model_lineage(directory)} for name, directory in models.items()},
    }
    champion = champion or ({"status": "evaluated", "source": str(models["champion"])} if "champion" in models
                            else {"status": "none", "reason": "not requested"})
    context["champion"] = champion.get("source") if champion["status"] == "evaluated" else \
        f"none ({champion.get('reason', '')})"
    summary = {
        "models": results,
        "comparisons": comparisons(results, per_prompt),
        "ab": ab,
        "gate_inputs": gate_inputs(results, ab),
        "champion": champion,
        "judge": JUDGE,
        "prompt_sets": prompt_sets,
        "context": context,
        "lineage": lineage,
        "clips": clips,
        "per_prompt": {name: {k: v.tolist() for k, v in scores.items()} for name, scores in per_prompt.items()},
        "prompts": [p.__dict__ for p in prompts],
    }
    summary = _json_safe(summary)
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    grid_texts = [prompts[i].text for i in grid_index]
    write_report(output_dir, results, context, grid_texts, grid_images, summary["comparisons"], ab)
    from components.evaluate.modelcard import write_model_card

    write_model_card(output_dir, summary, grid_texts, grid_images)
    return summary


def png_data_uri(image: np.ndarray) -> str:
    """A PNG data URI of a uint8 [H,W,3] image (embeds images in self-contained HTML)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(output_dir: Path, results: dict[str, dict[str, Any]], context: dict[str, Any],
                 grid_prompts: list[str], grid_images: dict[str, np.ndarray],
                 compared: dict[str, float] | None = None, ab: dict[str, dict[str, Any]] | None = None) -> Path:
    """A self-contained HTML page: headline metrics side by side, the A/B win rates, the checks,
    then one row per grid prompt with each model's image next to the others (uint8 [P,H,W,3] per
    model in `grid_images`)."""
    header = "".join(f"<th>{html.escape(n)}</th>" for n in results)
    shown = list(HEADLINE) + ["throughput_images_per_s", "steps"] + \
        [m for m in ("video_frame_change",) if any(m in v for v in results.values())]
    rows = []
    for metric in shown:
        cells = "".join(f"<td>{_cell(results[n], metric)}</td>" for n in results)
        rows.append(f"<tr><td>{metric} ({BETTER.get(metric, '')})</td>{cells}</tr>")
    ab_table = ""
    if ab:
        ab_rows = "".join(
            f"<tr><td>{html.escape(pair.replace('_vs_', ' vs '))}</td><td>{r['win_rate']:.3f}</td>"
            f"<td>{r['ci_low']:.3f} .. {r['ci_high']:.3f}</td><td>{r['wins']} / {r['ties']} / {r['losses']}</td>"
            f"<td>{r['n']}</td></tr>" for pair, r in ab.items())
        ab_table = ("<h2>A/B win rates</h2><p>" + html.escape(JUDGE) + "</p><table><tr><th>pair</th><th>win rate</th>"
                    f"<th>95% interval</th><th>wins / ties / losses</th><th>n</th></tr>{ab_rows}</table>")
    check_rows = []
    for key, value in (compared or {}).items():
        if key.startswith("check.") and key.count(".") == 1:
            overlap = compared.get(f"{key}.ci_overlap", float("nan"))
            low, high = compared.get(f"{key}.difference_ci_low"), compared.get(f"{key}.difference_ci_high")
            verdict = "yes" if value else "no"
            note = "95% intervals overlap" if overlap else "95% intervals separate"
            check_rows.append(f"<tr><td>{html.escape(key.removeprefix('check.').replace('_', ' '))}</td>"
                              f"<td>{verdict}</td><td>{note}</td><td>{_number(low)} .. {_number(high)}</td></tr>")
    checks = ("<h2>Checks</h2><table><tr><th>claim</th><th>holds (means)</th><th>unpaired</th>"
              f"<th>paired difference, 95% interval</th></tr>{''.join(check_rows)}</table>") if check_rows else ""
    sample_header = "".join(f"<th>{html.escape(n)}</th>" for n in grid_images)
    sample_rows = []
    for index, prompt in enumerate(grid_prompts):
        cells = "".join(f"<td><img src='{png_data_uri(images[index])}'></td>" for images in grid_images.values())
        sample_rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reelforge evaluation</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}img{{width:96px;height:96px;image-rendering:pixelated}}</style></head><body>
<h1>Evaluation</h1>
<p>{context['prompts']} prompts from <code>{html.escape(str(context['prompt_set']))}</code>. Alignment chance floor
{context['alignment_chance_floor']:.3f}; real held-out images score {context['alignment_ceiling_real_images']:.3f}.
<code>{UNTRAINED}</code> is a freshly initialised model of the same architecture: its samples are decoded
starting noise, the floor every metric should beat. Aesthetic scorer: {html.escape(str(context.get('aesthetic_scorer', '')))}.
fid/kid: Frechet/kernel distance in EfficientNet-Lite0 features, not Inception-FID.
Champion: {html.escape(str(context.get('champion', 'none')))}.</p>
<table><tr><th>metric</th>{header}</tr>{''.join(rows)}</table>
{ab_table}
{checks}
<h2>Samples (same prompt and seed for every model)</h2>
<table><tr><th>prompt</th>{sample_header}</tr>{''.join(sample_rows)}</table></body></html>"""
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# Which direction is better, per metric, for tables.
BETTER = {"alignment": "higher is better", "aesthetic": "higher is better", "category_accuracy": "higher is better",
          "fid": "lower is better", "kid": "lower is better", "realism": "higher is better",
          "diversity": "higher is better", "latency_ms": "lower is better",
          "throughput_images_per_s": "higher is better", "steps": "sampling steps",
          "video_frame_change": "0 = frozen"}


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and value is not None else "n/a"


def _cell(values: dict[str, Any], metric: str) -> str:
    """One table cell: the value, with its 95% interval where one was computed."""
    if values.get(metric) is None:
        return "&mdash;"
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    interval = f" <small>[{_number(low)}, {_number(high)}]</small>" if low is not None and high is not None else ""
    return f"{values[metric]:.4g}{interval}"


def stage(recipe: Recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: evaluate `inputs['pretrained']`, `inputs['tuned']`,
    `inputs['student']` (when given), the champion and the untrained floor.

    The champion is `inputs['champion']` (a model directory) when given, else the registry's
    ``models:/<register.model_name>@<register.champion_alias>`` (with ``evaluate.champion`` on).
    Metrics: ``<model>.<metric>``, ``ab.<pair>.<win_rate|ci_low|ci_high|n|wins|ties|losses>``, the
    context figures and the comparisons; the KFP metadata carries the per-model figures, the A/B
    results and the comparisons. Artifacts: report.html, metrics.json, model_card.md/.html and
    grids/<model>.png; when the tuned generator trained on clips, its clips go to ``clips/tuned``.
    """
    from components.runner import StageOutput

    out = Path(outputs["evaluation"])
    models = {name: Path(inputs[name]) for name in ("pretrained", "tuned", "student") if inputs.get(name)}
    with tempfile.TemporaryDirectory(prefix="reelforge-champion-") as scratch:
        if inputs.get("champion"):
            models["champion"] = Path(inputs["champion"])
            champion = {"status": "evaluated", "source": str(inputs["champion"])}
        elif recipe.evaluate.champion:
            directory, champion = find_champion(recipe.register.model_name, recipe.register.champion_alias,
                                                Path(scratch))
            if directory is not None:
                models["champion"] = directory
        else:
            champion = {"status": "none", "reason": "evaluate.champion is false"}
        summary = run(recipe.evaluate, inputs["dataset"], models, out, recipe.text.max_tokens,
                      aesthetic=recipe.curate.aesthetic, untrained_from="tuned" if "tuned" in models else None,
                      video_from="tuned", video_fps=recipe.curate.video.fps, champion=champion,
                      git_commit=context.commit(), pipeline_run=context.pipeline_job_id)
    per_model = {f"{name}.{metric}": float(value) for name, values in summary["models"].items()
                 for metric, value in values.items() if isinstance(value, (int, float))}
    ab = {f"ab.{pair}.{key}": float(value) for pair, values in summary["ab"].items() for key, value in values.items()}
    compared = {k: float(v) for k, v in summary["comparisons"].items() if v is not None}
    metrics = {**per_model, **ab, **compared}
    metrics.update({k: float(v) for k, v in summary["context"].items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name, clip in summary["clips"].items():
        if hasattr(tracker, "log_video"):
            tracker.log_video(np.load(out / clip["file"], allow_pickle=False), f"clips/{name}", fps=clip["fps"])
    tracker.log_artifact(out / "grids", "grids")
    tracker.set_tags({"champion": summary["champion"].get("source") or "none",
                      "candidate": str(summary["gate_inputs"]["candidate"])})
    return StageOutput(metadata={**per_model, **ab, **compared, "champion": summary["champion"].get("source") or "none"},
                       metrics=metrics,
                       artifacts=[out / "report.html", out / "metrics.json", out / "model_card.md",
                                  out / "model_card.html"])
