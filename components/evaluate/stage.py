"""Evaluate: the pretrained and the quality-tuned model side by side on a fixed prompt set.

Metrics (per model, same prompts, same seed):
- alignment: retrieval-based text-image alignment (no CLIP offline): mean MiniLM similarity
  between the prompt and the captions of the k nearest real images in EfficientNet feature
  space; reported with a 95% interval, next to its chance floor and the real-image ceiling.
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

from components.config import EvaluateConfig, Recipe
from components.evaluate.metrics import (
    caption_alignment_chance,
    diversity,
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
from models.generate import TextToImage, image_grid, to_uint8
from models.hardware import autocast_dtype, resolve_precision
from models.text_encoder import TextEncoder
from models.vision_features import ImageFeatureExtractor



@dataclass(frozen=True)
class Reference:
    """Real images the generated ones are compared with."""

    features: np.ndarray  # all curated images (retrieval reference)
    caption_embeddings: np.ndarray
    categories: list[str]
    holdout_features: np.ndarray  # val split only (distribution reference for FD/KID)


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
                 reference: Reference, extractor: ImageFeatureExtractor, knn: int) -> dict[str, Any]:
    """All metrics for one set of generated images ([B,C,H,W] in [-1,1]), one per prompt."""
    feats = extractor.features(images).numpy()
    alignment = knn_caption_alignment(feats, prompt_embeddings, reference.features, reference.caption_embeddings, knn)
    mean, low, high = mean_confidence_interval(alignment)
    kid_size = min(len(feats), len(reference.holdout_features))
    kid_mean, _ = kernel_inception_distance(feats, reference.holdout_features, subsets=20, subset_size=max(2, kid_size))
    quality = [technical_quality(image)["quality"] for image in to_uint8(images)]
    return {
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
        max_tokens: int) -> dict[str, Any]:
    """Evaluate each named model directory; writes report.html, grids and metrics.json to `output_dir`."""
    configure_torch(0)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(config.prompts, config.max_prompts)
    encoder = TextEncoder(max_tokens=max_tokens)
    extractor = ImageFeatureExtractor(input_size=config.feature_resolution)
    reference, context = _reference(Path(dataset_dir), encoder, extractor)
    prompt_embeddings = encoder.encode([p.text for p in prompts])
    pooled = prompt_embeddings.pooled.numpy()
    context["alignment_chance_floor"] = float(caption_alignment_chance(pooled, reference.caption_embeddings).mean())
    context["prompts"] = len(prompts)
    context["prompt_set"] = config.prompts
    # bf16 sampling where the hardware runs it fast (it scored the same as fp32 where measured).
    sampling = {**config.sampling.model_dump(), "autocast_dtype": autocast_dtype(resolve_precision("auto"))}
    results: dict[str, dict[str, Any]] = {}
    grid_images: dict[str, np.ndarray] = {}
    grid_index = [prompts.index(p) for p in spread(prompts, config.grid_prompts)]
    for name, directory in models.items():
        generator = TextToImage.from_dir(directory, text_encoder=encoder)
        images = generator.generate_tensor([p.text for p in prompts], **sampling)
        batched_ms, single_ms = measure_latency(generator, [p.text for p in prompts], sampling)
        metrics = score_images(images, prompts, pooled, reference, extractor, config.knn)
        metrics.update(latency_ms=batched_ms, latency_single_ms=single_ms, steps=config.sampling.steps)
        results[name] = metrics
        grid_images[name] = to_uint8(images[grid_index])
        Image.fromarray(image_grid(grid_images[name], columns=8, upscale=2)).save(output_dir / f"grid_{name}.png")
    # The floor every metric should beat: an untrained adaLN-zero model returns its input noise.
    noise = torch.randn((len(prompts), 3, generator.image_size, generator.image_size),
                        generator=torch.Generator().manual_seed(config.sampling.seed)).clamp(-1, 1)
    results["noise_floor"] = score_images(noise, prompts, pooled, reference, extractor, config.knn)
    summary = {"models": results, "context": context, "prompts": [p.__dict__ for p in prompts]}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_report(output_dir, results, context, [prompts[i].text for i in grid_index], grid_images)
    return summary


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(output_dir: Path, results: dict[str, dict[str, Any]], context: dict[str, Any],
                 grid_prompts: list[str], grid_images: dict[str, np.ndarray]) -> Path:
    """A self-contained HTML page: headline metrics side by side, then one row per grid prompt
    with each model's image next to the others (uint8 [P,H,W,3] per model in `grid_images`)."""
    better = {"alignment": "higher", "category_accuracy": "higher", "fd": "lower", "kid": "lower",
              "realism": "higher", "diversity": "higher", "latency_ms": "lower"}
    header = "".join(f"<th>{html.escape(n)}</th>" for n in results)
    rows = []
    for metric in HEADLINE:
        cells = "".join(
            f"<td>{results[n][metric]:.4g}</td>" if metric in results[n] else "<td>&mdash;</td>" for n in results)
        rows.append(f"<tr><td>{metric} ({better[metric]} is better)</td>{cells}</tr>")
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
{context['alignment_chance_floor']:.3f}; real held-out images score {context['alignment_ceiling_real_images']:.3f}.</p>
<table><tr><th>metric</th>{header}</tr>{''.join(rows)}</table>
<h2>Samples (same prompt and seed for every model)</h2>
<table><tr><th>prompt</th>{sample_header}</tr>{''.join(sample_rows)}</table></body></html>"""
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def stage(recipe: Recipe, inputs, outputs, tracker, context, **_: object):
    """Tracking glue for the runner: compare `inputs['pretrained']` and `inputs['tuned']`."""
    from components.runner import StageOutput

    out = Path(outputs["evaluation"])
    summary = run(recipe.evaluate, inputs["dataset"], {"pretrained": inputs["pretrained"], "tuned": inputs["tuned"]},
                  out, recipe.text.max_tokens)
    metrics = {f"{name}.{metric}": float(value) for name, values in summary["models"].items()
               for metric, value in values.items()}
    metrics.update({k: float(v) for k, v in summary["context"].items() if isinstance(v, (int, float))})
    for name in ("pretrained", "tuned"):
        tracker.log_image(Image.open(out / f"grid_{name}.png"), f"grids/{name}.png")
    tuned, pretrained = summary["models"]["tuned"], summary["models"]["pretrained"]
    metadata = {f"tuned.{k}": float(v) for k, v in tuned.items()}
    metadata.update({f"pretrained.{k}": float(v) for k, v in pretrained.items()})
    return StageOutput(metadata=metadata, metrics=metrics,
                       artifacts=[out / "report.html", out / "metrics.json"])
