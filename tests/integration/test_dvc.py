"""DVC end to end: `dvc repro` builds the datasets, a second repro is a no-op, and a fresh clone
gets byte-identical shards back with `dvc pull`.

Runs on a copy of the working tree (tracked + untracked-but-not-ignored files, so an uncommitted
dvc.yaml is tested too) in a temporary git repo, with a small generated image folder as the
source and a fast recipe, so it takes seconds and never touches the checkout's data or remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, reelforge
GOOD_IMAGES = 10


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        GIT_AUTHOR_NAME="reelforge-test",
        GIT_AUTHOR_EMAIL="test@reelforge.invalid",
        GIT_COMMITTER_NAME="reelforge-test",
        GIT_COMMITTER_EMAIL="test@reelforge.invalid",
    )
    # The stages must log to the tmp repo's ./work sqlite store and must not use the local cache.
    for key in ("MLFLOW_TRACKING_URI", "REELFORGE_CACHE_DIR", "GIT_DIR", "GIT_WORK_TREE"):
        env.pop(key, None)
    return env


def _run(*cmd: str | Path, cwd: Path) -> str:
    """Run a command; on failure raise with its stdout and stderr. Returns stdout + stderr."""
    args = [str(c) for c in cmd]
    try:
        done = subprocess.run(args, cwd=cwd, env=_env(), check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as error:
        raise AssertionError(
            f"`{' '.join(args)}` failed with exit code {error.returncode} in {cwd}\n"
            f"--- stdout ---\n{error.stdout}\n--- stderr ---\n{error.stderr}"
        ) from None
    return done.stdout + done.stderr


def _copy_working_tree(destination: Path) -> None:
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode()
    for relative in filter(None, listing.split("\0")):
        source = REPO / relative
        if relative == "dvc.lock" or not source.is_file():  # deleted-but-tracked files; the checkout's lock
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _make_source(root: Path) -> None:
    """GOOD_IMAGES distinct 24 px PNGs with captions, plus one 4 px image that curation rejects."""
    root.mkdir(parents=True)
    captions = []
    for index in range(GOOD_IMAGES):
        image = Image.new("RGB", (24, 24), (20 * index, 255 - 20 * index, 128))
        image.paste((255, 255, 255), (index, index, index + 8, index + 8))
        name = f"shapes/square_{index:02d}.png"
        (root / name).parent.mkdir(exist_ok=True)
        image.save(root / name)
        captions.append({"file": name, "caption": f"a white square on colour {index}"})
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "tiny.png")
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_dvc_repro_push_pull_roundtrip(tmp_path: Path) -> None:
    if not (BIN / "dvc").exists() or not (BIN / "reelforge").exists():
        pytest.fail(f"dvc and reelforge must be installed next to {sys.executable} (make install)")
    source = tmp_path / "images"
    _make_source(source)
    first = tmp_path / "first"
    _copy_working_tree(first)
    assert (first / "dvc.yaml").is_file() and (first / ".dvc" / "config").is_file()

    # A fast recipe, and dvc.yaml pointed at it and at the folder source (the one-line switch).
    (first / "recipes" / "dvc-test.yaml").write_text(yaml.safe_dump({
        "name": "dvc-test",
        "tracking": {"experiment": "reelforge-dvc-test"},
        "ingest": {"source": f"folder:{source}", "shard_size": 4},
        # Synthetic look-alike images: only dedup by bytes here (this test is about DVC), few scorers.
        "curate": {"resolution": 16, "min_side": 8, "shard_size": 4, "val_fraction": 0.2, "workers": 1,
                   "scorers": ["technical", "features"], "dedup": {"perceptual": False, "semantic": False}},
        "text": {"max_tokens": 16},
        "model": {"preset": "tiny"},  # a 16 px model, to match curate.resolution (validated at load)
    }))
    pipeline = yaml.safe_load((first / "dvc.yaml").read_text())
    variables = pipeline["vars"][0]
    assert {"recipe", "source_kind", "source_dir"} <= set(variables), variables
    variables.update(recipe="recipes/dvc-test.yaml", source_kind="folder", source_dir=str(source))
    (first / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))

    _run("git", "init", "-q", "-b", "main", cwd=first)
    _run("git", "add", "-A", cwd=first)
    _run("git", "commit", "-q", "-m", "project", cwd=first)

    # 1. Build both datasets.
    out = _run(BIN / "dvc", "repro", cwd=first)
    assert "Running stage 'ingest'" in out and "Running stage 'curate'" in out, out
    curated = first / "data" / "curated"
    manifest = pd.read_parquet(curated / "manifest.parquet")
    assert len(manifest) == GOOD_IMAGES
    report = json.loads((curated / "report.json").read_text())
    assert (report["input"], report["accepted"], report["reasons"]) == (GOOD_IMAGES + 1, GOOD_IMAGES, {"too_small": 1})
    assert sorted(p.name for p in curated.glob("*.tar")) and list((first / "data" / "raw").glob("raw-*.tar"))
    assert (first / "work" / "mlflow.db").is_file()  # MLflow went to the gitignored ./work
    status = _run("git", "status", "--porcelain", cwd=first)
    assert "data/" not in status and "work/" not in status, status  # outputs are gitignored

    # 2. Nothing changed: both stages are skipped.
    out = _run(BIN / "dvc", "repro", cwd=first)
    assert "Stage 'ingest' didn't change, skipping" in out, out
    assert "Stage 'curate' didn't change, skipping" in out, out
    assert "Running stage" not in out, out

    # 3. Push to the default remote (<repo>/dvc-remote, from the committed .dvc/config), commit the lock.
    _run(BIN / "dvc", "push", cwd=first)
    remote = first / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"
    _run("git", "add", "dvc.lock", cwd=first)
    _run("git", "commit", "-q", "-m", "datasets", cwd=first)
    assert _run("git", "status", "--porcelain", cwd=first) == ""

    # 4. A fresh clone, pointed at that remote for this clone only, pulls byte-identical datasets.
    second = tmp_path / "second"
    _run("git", "clone", "-q", first, second, cwd=tmp_path)
    assert not (second / "data").exists()
    _run(BIN / "dvc", "remote", "modify", "--local", "local", "url", remote, cwd=second)
    _run(BIN / "dvc", "pull", cwd=second)
    for stage_dir in ("raw", "curated"):
        pulled, built = _hashes(second / "data" / stage_dir), _hashes(first / "data" / stage_dir)
        assert pulled == built and pulled, stage_dir
    assert "up to date" in _run(BIN / "dvc", "status", cwd=second)
