"""Shards and content hashes: deterministic bytes, so DVC and caches see unchanged data as unchanged."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from components.storage import ShardWriter, directory_hash, iter_shards, read_manifest, shard_paths, write_manifest


def _write(directory: Path, count: int) -> list[Path]:
    with ShardWriter(directory, "train", shard_size=3) as writer:
        for index in range(count):
            writer.write(f"k{index:03d}", {"txt": f"caption {index}".encode(), "png": bytes([index]) * 10})
    return writer.paths


def test_shards_split_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    paths = _write(tmp_path, 7)
    assert [p.name for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    samples = list(iter_shards(shard_paths(tmp_path, "train")))
    assert [s.key for s in samples] == [f"k{i:03d}" for i in range(7)]
    assert samples[4].members == {"png": bytes([4]) * 10, "txt": b"caption 4"}


def test_same_samples_give_identical_bytes_and_hash(tmp_path: Path) -> None:
    _write(tmp_path / "a", 5)
    _write(tmp_path / "b", 5)
    assert (tmp_path / "a/train-00000.tar").read_bytes() == (tmp_path / "b/train-00000.tar").read_bytes()
    assert directory_hash(tmp_path / "a") == directory_hash(tmp_path / "b")
    (tmp_path / "b" / "report.html").write_text("reports do not change the data hash")
    assert directory_hash(tmp_path / "a") == directory_hash(tmp_path / "b")
    _write(tmp_path / "b", 6)
    assert directory_hash(tmp_path / "a") != directory_hash(tmp_path / "b")


def test_keys_that_would_break_webdataset_are_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "x", 2) as writer, pytest.raises(ValueError, match="must not contain"):
        writer.write("a.b", {"txt": b""})


def test_missing_manifest_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a reelforge dataset"):
        read_manifest(tmp_path)
    write_manifest(pd.DataFrame({"id": ["a"]}), tmp_path)
    assert read_manifest(tmp_path)["id"].tolist() == ["a"]
    assert not list(tmp_path.glob("*.tmp"))
