"""Source adapters: captions from captions.jsonl, sidecar .txt or the file name, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.ingest.sources import (
    FolderSource,
    RawItem,
    S3Source,
    SourceError,
    TuxPaintSource,
    parse_s3_spec,
    parse_source,
)


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
    with pytest.raises(SourceError, match=r"s3://<bucket>/<prefix>"):
        parse_source("nope")


@pytest.mark.parametrize(
    ("spec", "bucket", "prefix", "name"),
    [
        ("s3://my-bucket", "my-bucket", "", "s3://my-bucket"),
        ("s3://my-bucket/", "my-bucket", "", "s3://my-bucket"),
        ("s3://my-bucket/images", "my-bucket", "images", "s3://my-bucket/images"),
        ("s3://data.example/raw/2024/06/", "data.example", "raw/2024/06", "s3://data.example/raw/2024/06"),
    ],
)
def test_s3_specs_split_into_bucket_and_prefix_without_touching_the_network(
    spec: str, bucket: str, prefix: str, name: str
) -> None:
    assert parse_s3_spec(spec) == (bucket, prefix)
    source = parse_source(spec)  # no server, no credentials: parsing must not connect
    assert isinstance(source, S3Source)
    assert (source.bucket, source.prefix, source.name, source.describe()) == (bucket, prefix, name, name)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("s3://", r"'s3://': missing bucket name; use s3://<bucket>/<prefix>"),
        ("s3:///images", r"missing bucket name"),
        ("s3:bucket/images", r"an S3 source looks like s3://<bucket>/<prefix>"),
        ("s3://My_Bucket/x", r"'My_Bucket' is not a valid bucket name"),
        ("s3://ab/x", r"'ab' is not a valid bucket name"),
        ("s3://bucket/x?endpoint=http://localhost:9000", r"no query or fragment; set the endpoint with AWS_ENDPOINT_URL_S3"),
    ],
)
def test_bad_s3_specs_are_rejected_with_the_fix(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_source(spec)


def test_raw_item_reads_local_files_or_through_its_reader(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"local bytes")
    local = RawItem(str(tmp_path / "a.png"), "a.png", None, "none", None)
    remote = RawItem("s3://bucket/a.png", "a.png", None, "none", None, reader=lambda: b"remote bytes")
    assert (local.read(), remote.read()) == (b"local bytes", b"remote bytes")
    # The reader is how bytes are fetched, not what the item is: it stays out of equality and repr.
    assert remote == RawItem("s3://bucket/a.png", "a.png", None, "none", None, reader=lambda: b"other")
    assert "reader" not in repr(remote)


def test_folder_source_keeps_videos_as_samples(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "b.mov", "c.webm", "d.mkv", "e.avi", "f.jpg", ".hidden.mp4", "notes.md"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    assert [i.relative_path for i in FolderSource(tmp_path).items()] == [
        f"clips/{name}" for name in ("a.mp4", "b.mov", "c.webm", "d.mkv", "e.avi", "f.jpg")
    ]
