"""Source adapters: captions from captions.jsonl, sidecar .txt or the file name, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.ingest.sources import FolderSource, SourceError, TuxPaintSource, parse_source


def test_folder_source_reads_jsonl_then_sidecar_and_keeps_uncaptioned_files(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"y")
    (tmp_path / "b.txt").write_bytes("a caf\xe9 sign\nsecond line".encode("latin-1"))
    (tmp_path / "c.webp").write_bytes(b"z")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "an apple"}) + "\n")
    items = {item.relative_path: item for item in FolderSource(tmp_path).items()}
    assert set(items) == {"a.png", "b.jpg", "c.webp"}
    assert (items["a.png"].caption, items["a.png"].caption_source) == ("an apple", "captions_jsonl")
    # Not UTF-8: replaced characters, not a crash, and only the first line.
    assert items["b.jpg"].caption == "a caf\ufffd sign"
    assert (items["c.webp"].caption, items["c.webp"].caption_source) == (None, "none")


def test_bad_captions_jsonl_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{"file": "b.png"}\n')
    with pytest.raises(SourceError, match=r"captions.jsonl:2: expected a JSON object with 'file' and 'caption'"):
        FolderSource(tmp_path)


def test_tuxpaint_layout_caption_from_txt_or_file_name(tmp_path: Path) -> None:
    (tmp_path / "food").mkdir()
    (tmp_path / "food" / "red_apple.png").write_bytes(b"x")
    (tmp_path / "food" / "red_apple.txt").write_text("A red apple.\nfr.utf8=Une pomme rouge.\n")
    (tmp_path / "food" / "green_pear-2.png").write_bytes(b"y")
    (tmp_path / "food" / "green_pear-2.ogg").write_bytes(b"sound")
    items = list(TuxPaintSource(tmp_path).items())
    assert [(i.caption, i.caption_source, i.category) for i in items] == [
        ("green pear 2", "filename", "food"),
        ("A red apple.", "sidecar_txt", "food"),
    ]


def test_source_specs() -> None:
    with pytest.raises(SourceError, match="unknown source 'nope'"):
        parse_source("nope")
    with pytest.raises(SourceError, match="tuxpaint-stamps-default"):
        parse_source("tuxpaint:/does/not/exist")
    with pytest.raises(SourceError, match="S3 sources are not supported yet"):
        parse_source("s3://bucket/prefix")
