"""Evaluate: the untrained, the pretrained and the quality-tuned model side by side on a fixed prompt set.

Metrics (per model, same prompts, same seed):
- alignment: retrieval-based text-image alignment (no CLIP offline): mean MiniLM similarity
  between the prompt and the captions of the k nearest real images in EfficientNet feature
  space; reported with a 95% interval, next to its chance floor and the real-image ceiling.
- aesthetic: the curation's aesthetic scorer (``curate.aesthetic``: the default heuristic or
  the head trained on review labels), the same one that ranked the quality-tuning set, with a
  95% interval. Quality-tuning should raise it over the pretrained-only model (Emu).
- category_accuracy: k-NN category vote of each image vs the prompt's category.
- fd / kid: Frechet and kernel distance to the held-out real images in EfficientNet features
  (lower = closer to real data). With a few hundred images these are biased upwards: compare
  models within one run, not across runs with different sample counts.
- realism: cosine similarity of each image to its nearest real image in EfficientNet features
  (a per-sample quality score that noise cannot game); diversity: mean pairwise feature distance.
- technical_quality: the curation score (sharpness, colour, exposure) of the generated images;
  reported for reference only, since noise is sharp and colourful and scores high on it.
- latency_ms / latency_single_ms: median wall time per image at the recipe's steps, for a batch
  of 8 prompts and for one prompt, after warm-up.
- video_frame_change (a model whose generator trained on clips): mean absolute change between
  consecutive frames of a few generated clips, as a fraction of the pixel range (0 = frozen).

The floor every metric should beat is ``untrained``: a freshly initialised DiT of the evaluated
model's architecture, sampled through the same latent codec. adaLN-zero makes it predict zero
velocity, so its samples are the starting latent noise, decoded: the honest floor in latent
space (decoded noise is smoother than pixel noise and scores differently).

Comparisons (``comparisons`` in metrics.json, logged as metrics): ``tuned_minus_pretrained.<m>``
for the headline metrics, and ``check.*`` booleans (0/1) with their confidence intervals, see
:func:`comparisons`.
"""

from __future__ import annotations

import base64
import html
import io
import json
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
    caption_alignment_chance,
    compare_paired,
    diversity,
    frame_change,
    frechet_distance,
    kernel_inception_distance,
    knn_caption_alignment,
    knn_category_accuracy,
    mean_confidence_interval,
    realism,
)
from components.evaluate.metrics import HEADLINE_METRICS as HEADLINE
from components.evaluate.prompts import Prompt, load_prompts, spread
from components.media import technical_quality
from components.training import configure_torch, embed, load_split
from models.dit import build
from models.generate import TextToImage, image_grid, to_uint8
from models.hardware import autocast_dtype, resolve_precision
from models.text_encoder import TextEncoder
from models.vision_features import ImageFeatureExtractor

# Name of the untrained floor in results, grids and metric keys.
UNTRAINED = "untrained"
# Clips generated for the video metric and the logged clip grid (each costs frames/1 images).
VIDEO_PROMPTS = 4
# (winner, loser, metric): the claims issue 4 makes about the three models.
CHECKS = (("tuned", "pretrained", "aesthetic"), ("pretrained", UNTRAINED, "alignment"),
          ("tuned", UNTRAINED, "alignment"))


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
    reference = Reference(np.concatenate([feats_train, feats_val]), captions, train.categories + val.categories, feats_val)
    # Ceiling: real held-out images retrieved against the train images and scored with their own captions.
    ceiling = knn_caption_alignment(feats_val, captions[len(train.captions):], feats_train,
                                    captions[: len(train.captions)])
    return reference, {"alignment_ceiling_real_images": float(ceiling.mean())}


def score_images(images: torch.Tensor, prompts: list[Prompt], prompt_embeddings: np.ndarray,
                 reference: Reference, extractor: ImageFeatureExtractor, knn: int,
                 aesthetic: AestheticScorer | None = None) -> Scored:
    """All metrics for one set of generated images ([B,C,H,W] in [-1,1]), one per prompt.

    `aesthetic` adds the aesthetic score (skipped when None). A head trained on review labels
    reads EfficientNet features at the curation's 128 px; when `extractor` embeds at another
    size, the images are embedded again at 128 px for it.
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
        "fd": frechet_distance(feats, reference.holdout_features),
        "kid": kid_mean,
        "realism": float(realism(feats, reference.features).mean()),
        "technical_quality": float(np.mean(quality)),
        "diversity": diversity(feats),
    }
    per_prompt = {"alignment": alignment}
    if aesthetic is not None:
        aesthetic_feats = feats
        if isinstance(aesthetic, LearnedAestheticScorer) and extractor.input_size != CURATION_FEATURE_SIDE:
            aesthetic_feats = ImageFeatureExtractor(input_size=CURATION_FEATURE_SIDE).features(images).numpy()
        scores = np.asarray(aesthetic.score(list(pixels), aesthetic_feats), dtype=np.float64)
        metrics["aesthetic"], metrics["aesthetic_ci_low"], metrics["aesthetic_ci_high"] = \
            mean_confidence_interval(scores)
        per_prompt["aesthetic"] = scores
    return Scored(metrics, per_prompt)


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


def run(config: EvaluateConfig, dataset_dir: Path, models: dict[str, Path], output_dir: Path,
        max_tokens: int, aesthetic: AestheticConfig | None = None, untrained_from: str | None = None,
        video_from: str | None = None, video_fps: float = 8.0) -> dict[str, Any]:
    """Evaluate each named model directory and the untrained floor; writes report.html, grids and metrics.json.

    - `aesthetic`: the curation's aesthetic scorer settings (default scorer when None).
    - `untrained_from`: whose architecture and codec the ``untrained`` entry copies (default:
      the last model); it is scored first, so results read floor -> pretrained -> tuned.
    - `video_from`: a model that, if its generator trained on clips (:func:`clip_frames`),
      also makes clips for the first prompts: ``video_frame_change`` in its metrics and
      uint8 [N,T,H,W,3] in ``clips_<name>.npy`` (played back at `video_fps`).
    """
    configure_torch(0)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(config.prompts, config.max_prompts)
    texts = [p.text for p in prompts]
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
    # bf16 sampling where the hardware runs it fast (it scored the same as fp32 where measured).
    sampling = {**config.sampling.model_dump(), "autocast_dtype": autocast_dtype(resolve_precision("auto"))}
    grid_index = [prompts.index(p) for p in spread(prompts, config.grid_prompts)]

    generators = {name: TextToImage.from_dir(directory, text_encoder=encoder) for name, directory in models.items()}
    untrained_from = untrained_from or list(models)[-1]
    if untrained_from not in generators:
        raise ValueError(f"untrained_from {untrained_from!r} is not one of the evaluated models {sorted(models)}")
    generators = {UNTRAINED: untrained_like(generators[untrained_from], config.sampling.seed), **generators}

    results: dict[str, dict[str, float]] = {}
    per_prompt: dict[str, dict[str, np.ndarray]] = {}
    grid_images: dict[str, np.ndarray] = {}
    clips: dict[str, dict[str, Any]] = {}
    for name, generator in generators.items():
        images = generator.generate_tensor(texts, **sampling)
        batched_ms, single_ms = measure_latency(generator, texts, sampling)
        scored = score_images(images, prompts, pooled, reference, extractor, config.knn, scorer)
        results[name] = {**scored.metrics, "latency_ms": batched_ms, "latency_single_ms": single_ms,
                         "steps": config.sampling.steps}
        per_prompt[name] = scored.per_prompt
        grid_images[name] = to_uint8(images[grid_index])
        Image.fromarray(image_grid(grid_images[name], columns=8, upscale=2)).save(output_dir / f"grid_{name}.png")
        frames = clip_frames(generator.config) if name == video_from else None
        if frames is not None and frames > 1:
            clip_prompts = spread(texts, VIDEO_PROMPTS)
            video = to_uint8(generator.generate_tensor(clip_prompts, frames=frames, **sampling))  # [N,T,H,W,3]
            results[name]["video_frame_change"] = float(frame_change(video).mean())
            np.save(output_dir / f"clips_{name}.npy", video, allow_pickle=False)
            clips[name] = {"file": f"clips_{name}.npy", "frames": frames, "fps": video_fps, "prompts": clip_prompts}

    summary = {
        "models": results,
        "comparisons": comparisons(results, per_prompt),
        "context": context,
        "clips": clips,
        "per_prompt": {name: {k: v.tolist() for k, v in scores.items()} for name, scores in per_prompt.items()},
        "prompts": [p.__dict__ for p in prompts],
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_report(output_dir, results, context, [prompts[i].text for i in grid_index], grid_images,
                 summary["comparisons"])
    return summary


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(output_dir: Path, results: dict[str, dict[str, Any]], context: dict[str, Any],
                 grid_prompts: list[str], grid_images: dict[str, np.ndarray],
                 compared: dict[str, float] | None = None) -> Path:
    """A self-contained HTML page: headline metrics side by side, the checks, then one row per grid
    prompt with each model's image next to the others (uint8 [P,H,W,3] per model in `grid_images`)."""
    better = {"alignment": "higher", "aesthetic": "higher", "category_accuracy": "higher", "fd": "lower",
              "kid": "lower", "realism": "higher", "diversity": "higher", "latency_ms": "lower",
              "video_frame_change": "0 = frozen"}
    header = "".join(f"<th>{html.escape(n)}</th>" for n in results)
    shown = list(HEADLINE) + [m for m in ("video_frame_change",) if any(m in v for v in results.values())]
    rows = []
    for metric in shown:
        cells = "".join(f"<td>{_cell(results[n], metric)}</td>" for n in results)
        label = f"{better[metric]} is better" if better[metric] in ("higher", "lower") else better[metric]
        rows.append(f"<tr><td>{metric} ({label})</td>{cells}</tr>")
    check_rows = []
    for key, value in (compared or {}).items():
        if key.startswith("check.") and key.count(".") == 1:
            overlap = compared.get(f"{key}.ci_overlap", float("nan"))
            low, high = compared.get(f"{key}.difference_ci_low"), compared.get(f"{key}.difference_ci_high")
            verdict = "yes" if value else "no"
            note = "95% intervals overlap" if overlap else "95% intervals separate"
            check_rows.append(f"<tr><td>{html.escape(key.removeprefix('check.').replace('_', ' '))}</td>"
                              f"<td>{verdict}</td><td>{note}</td><td>{low:.3g} .. {high:.3g}</td></tr>")
    checks = ("<h2>Checks</h2><table><tr><th>claim</th><th>holds (means)</th><th>unpaired</th>"
              f"<th>paired difference, 95% interval</th></tr>{''.join(check_rows)}</table>") if check_rows else ""
    sample_header = "".join(f"<th>{html.escape(n)}</th>" for n in grid_images)
    sample_rows = []
    for index, prompt in enumerate(grid_prompts):
        cells = "".join(f"<td><img src='{_png_data_uri(images[index])}'></td>" for images in grid_images.values())
        sample_rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reelforge evaluation</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}img{{width:96px;height:96px;image-rendering:pixelated}}</style></head><body>
<h1>Evaluation</h1>
<p>{context['prompts']} prompts from <code>{html.escape(str(context['prompt_set']))}</code>. Alignment chance floor
{context['alignment_chance_floor']:.3f}; real held-out images score {context['alignment_ceiling_real_images']:.3f}.
<code>{UNTRAINED}</code> is a freshly initialised model of the same architecture: its samples are decoded
starting noise, the floor every metric should beat. Aesthetic scorer: {html.escape(str(context.get('aesthetic_scorer', '')))}.</p>
<table><tr><th>metric</th>{header}</tr>{''.join(rows)}</table>
{checks}
<h2>Samples (same prompt and seed for every model)</h2>
<table><tr><th>prompt</th>{sample_header}</tr>{''.join(sample_rows)}</table></body></html>"""
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _cell(values: dict[str, Any], metric: str) -> str:
    """One table cell: the value, with its 95% interval where one was computed."""
    if metric not in values:
        return "&mdash;"
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    interval = f" <small>[{low:.3g}, {high:.3g}]</small>" if low is not None and high is not None else ""
    return f"{values[metric]:.4g}{interval}"


def stage(recipe: Recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: compare `inputs['pretrained']`, `inputs['tuned']` and the untrained floor.

    Metrics: ``<model>.<metric>`` for untrained, pretrained and tuned, the context figures, and
    the comparisons (``tuned_minus_pretrained.*``, ``check.*``); the KFP metadata carries the
    same per-model figures and comparisons. Grids go to ``grids/<model>.png``; when the tuned
    generator trained on clips, its clips go to ``clips/tuned`` (mp4 + gif).
    """
    from components.runner import StageOutput

    out = Path(outputs["evaluation"])
    summary = run(recipe.evaluate, inputs["dataset"], {"pretrained": inputs["pretrained"], "tuned": inputs["tuned"]},
                  out, recipe.text.max_tokens, aesthetic=recipe.curate.aesthetic, untrained_from="tuned",
                  video_from="tuned", video_fps=recipe.curate.video.fps)
    per_model = {f"{name}.{metric}": float(value) for name, values in summary["models"].items()
                 for metric, value in values.items()}
    compared = {k: float(v) for k, v in summary["comparisons"].items()}
    metrics = {**per_model, **compared}
    metrics.update({k: float(v) for k, v in summary["context"].items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in summary["models"]:
        tracker.log_image(Image.open(out / f"grid_{name}.png"), f"grids/{name}.png")
    for name, clip in summary["clips"].items():
        if hasattr(tracker, "log_video"):
            tracker.log_video(np.load(out / clip["file"], allow_pickle=False), f"clips/{name}", fps=clip["fps"])
    return StageOutput(metadata={**per_model, **compared}, metrics=metrics,
                       artifacts=[out / "report.html", out / "metrics.json"])
