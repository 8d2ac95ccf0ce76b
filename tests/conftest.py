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


@pytest.fixture(scope="module")
def single_thread():
    """Small models spend more time handing work between threads than computing; one thread keeps them fast."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
