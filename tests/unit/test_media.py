"""Unit tests for components.media: every fixture is generated in tmp_path or memory."""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from components.media import (
    REASON_DESCRIPTIONS,
    DecodedImage,
    DecodePolicy,
    RejectReason,
    center_crop_resize,
    check_geometry,
    decode_image,
    image_to_array,
    image_to_png_bytes,
    sha256_bytes,
    sha256_file,
    technical_quality,
)

# --------------------------------------------------------------------------- helpers


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 80, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bilevel_png_bomb(side: int) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels, a few tens of KB on disk.

    Built by hand because letting Pillow save it would first allocate side*side bytes.
    """
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _assert_rgb(result: DecodedImage) -> Image.Image:
    assert result.ok, result.detail
    assert result.reason is None
    assert result.image is not None
    assert result.image.mode == "RGB"
    return result.image


# --------------------------------------------------------------------------- reasons


def test_every_reason_has_a_description_and_stable_value() -> None:
    assert set(REASON_DESCRIPTIONS) == set(RejectReason)
    assert all(REASON_DESCRIPTIONS[r].strip() for r in RejectReason)
    # The values are a storage format (Parquet manifests): pin them.
    assert {r.value for r in RejectReason} == {
        "empty_file",
        "unreadable",
        "unsupported_format",
        "truncated",
        "decompression_bomb",
        "file_too_large",
        "too_small",
        "animated",
        "bad_aspect_ratio",
        "exact_duplicate",
        "low_quality",
        "near_duplicate",
        "semantic_duplicate",
        "blurry",
        "bad_exposure",
        "poor_perceptual_quality",
        "too_much_text",
        "unsafe",
        "low_alignment",
        "low_aesthetic",
        "human_rejected",
        "no_caption",
        "low_fps",
        "too_short",
        "static",
        "jittery",
    }
    assert RejectReason.TRUNCATED == "truncated"


# --------------------------------------------------------------------------- rejects


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    result = decode_image(path)
    assert result.reason is RejectReason.EMPTY_FILE
    assert not result.ok and result.image is None
    assert str(path) in result.detail
    assert decode_image(b"").reason is RejectReason.EMPTY_FILE


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    result = decode_image(tmp_path / "nope.jpg")
    assert result.reason is RejectReason.UNREADABLE
    assert "nope.jpg" in result.detail


def test_random_bytes_are_unreadable() -> None:
    data = np.random.default_rng(0).bytes(4096)
    assert decode_image(data).reason is RejectReason.UNREADABLE


def test_text_file_named_png_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    result = decode_image(path)
    assert result.reason is RejectReason.UNREADABLE
    assert str(path) in result.detail


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_file_cut_in_half_is_truncated(tmp_path: Path, fmt: str) -> None:
    data = _encode(_noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    result = decode_image(path)
    assert result.reason is RejectReason.TRUNCATED, result.detail
    # The header survived, so the manifest still learns what the file claimed to be.
    assert (result.width, result.height, result.format) == (80, 64, fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_file_over_byte_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_encode(_noise(), "PNG"))
    result = decode_image(path, DecodePolicy(max_bytes=100))
    assert result.reason is RejectReason.FILE_TOO_LARGE


def test_20000x20000_png_is_a_bomb_with_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_bilevel_png_bomb(20_000))
    assert path.stat().st_size < 1_000_000

    # tracemalloc cannot see Pillow's C-level pixel buffers, so also prove that pixel
    # decoding never starts.
    def _no_decode(self: object) -> None:
        raise AssertionError("decode_image decoded a decompression bomb")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _no_decode)
    tracemalloc.start()
    try:
        result = decode_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.reason is RejectReason.DECOMPRESSION_BOMB, result.detail
    assert peak < 50 * 1024 * 1024


def test_policy_pixel_limit_is_checked_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 MP: below Pillow's own limit, above the default policy's 40 MP.
    data = _bilevel_png_bomb(8_000)

    def _no_decode(self: object) -> None:
        raise AssertionError("decode_image decoded an over-limit image")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", _no_decode)
    result = decode_image(data)
    assert result.reason is RejectReason.DECOMPRESSION_BOMB
    assert (result.width, result.height) == (8_000, 8_000)

    monkeypatch.undo()
    assert decode_image(_encode(_noise(), "PNG"), DecodePolicy(max_pixels=80 * 64 - 1)).reason is (
        RejectReason.DECOMPRESSION_BOMB
    )
    assert decode_image(_encode(_noise(), "PNG"), DecodePolicy(max_pixels=80 * 64)).ok


@pytest.mark.parametrize("fmt", ["TGA", "ICO"])
def test_format_outside_allow_list_is_unsupported(fmt: str) -> None:
    result = decode_image(_encode(_noise(32, 32), fmt))
    assert result.reason is RejectReason.UNSUPPORTED_FORMAT
    assert result.format == fmt


def test_allow_list_is_configurable() -> None:
    data = _encode(_noise(), "PNG")
    assert decode_image(data, DecodePolicy(allowed_formats=frozenset({"JPEG"}))).reason is (
        RejectReason.UNSUPPORTED_FORMAT
    )
    # Lower-case names and plain sets (as YAML recipes give them) are normalised.
    loose = DecodePolicy(allowed_formats={"png"})  # type: ignore[arg-type]
    assert loose.allowed_formats == frozenset({"PNG"})
    assert decode_image(data, loose).ok
    with pytest.raises(ValueError):
        DecodePolicy(background=(0, 0, 256))


# --------------------------------------------------------------------------- animation


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "green", "blue")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def test_animated_gif_rejected_by_default() -> None:
    result = decode_image(_animated_gif())
    assert result.reason is RejectReason.ANIMATED
    assert result.format == "GIF"


def test_animated_gif_first_frame_when_allowed() -> None:
    result = decode_image(_animated_gif(), DecodePolicy(allow_animated=True))
    image = _assert_rgb(result)
    assert "first_frame_only" in result.repairs
    assert image.size == (20, 10)
    r, g, b = image.getpixel((5, 5))
    assert r > 200 and g < 50 and b < 50  # frame 0 is red


def test_single_frame_gif_is_not_animated() -> None:
    result = decode_image(_encode(Image.new("RGB", (8, 8), "blue"), "GIF"))
    _assert_rgb(result)
    assert "palette_to_rgb" in result.repairs


def test_mpo_camera_jpeg_counts_as_jpeg() -> None:
    # Phone cameras write MPO (a JPEG plus extra pictures); it must not be rejected as
    # animated or as an unknown format.
    first, second = Image.new("RGB", (16, 12), "red"), Image.new("RGB", (16, 12), "blue")
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    result = decode_image(data, DecodePolicy(allowed_formats=frozenset({"JPEG"})))
    image = _assert_rgb(result)
    assert result.format == "MPO"
    assert "primary_image_only" in result.repairs
    assert image.getpixel((8, 6))[0] > 200


# --------------------------------------------------------------------------- repairs


def test_suffix_does_not_decide_format(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(_encode(_noise(), "JPEG"))
    result = decode_image(path)
    _assert_rgb(result)
    assert result.format == "JPEG"


def test_cmyk_jpeg_becomes_rgb_with_correct_colours() -> None:
    red_cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    result = decode_image(_encode(red_cmyk, "JPEG", quality=95))
    image = _assert_rgb(result)
    assert result.mode == "CMYK"
    assert result.repairs == ["cmyk_to_rgb"]
    r, g, b = image.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30  # not inverted


def test_palette_png_with_transparency_is_flattened_over_background() -> None:
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    for x in range(5, 10):
        for y in range(10):
            im.putpixel((x, y), 1)
    data = _encode(im, "PNG", transparency=0)  # index 0 (black) is transparent

    result = decode_image(data)
    image = _assert_rgb(result)
    assert result.mode == "P"
    assert "palette_to_rgb" in result.repairs and "alpha_flattened" in result.repairs
    assert image.getpixel((1, 1)) == (255, 255, 255)  # transparent -> background, not black
    assert image.getpixel((7, 1)) == (255, 0, 0)

    green = decode_image(data, DecodePolicy(background=(0, 255, 0))).image
    assert green is not None and green.getpixel((1, 1)) == (0, 255, 0)


def test_rgba_alpha_is_composited() -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.putpixel((1, 0), (0, 0, 0, 128))
    result = decode_image(_encode(im, "PNG"), DecodePolicy(background=(200, 200, 200)))
    image = _assert_rgb(result)
    assert result.repairs == ["alpha_flattened"]
    assert image.getpixel((0, 0)) == (0, 0, 255)
    assert image.getpixel((2, 2)) == (200, 200, 200)  # fully transparent red is hidden
    assert all(abs(c - 100) <= 1 for c in image.getpixel((1, 0)))  # half black over grey


def test_la_becomes_rgb() -> None:
    im = Image.new("LA", (4, 4), (50, 255))
    im.putpixel((0, 0), (0, 0))
    result = decode_image(_encode(im, "PNG"))
    image = _assert_rgb(result)
    assert result.mode == "LA"
    assert "alpha_flattened" in result.repairs
    assert image.getpixel((1, 1)) == (50, 50, 50)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32768, 65535, 16384]], dtype=np.uint16).repeat(3, axis=0)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    result = decode_image(_encode(im, "PNG"))
    image = _assert_rgb(result)
    assert result.mode.startswith("I")
    assert "16bit_to_8bit" in result.repairs
    row = [image.getpixel((x, 0))[0] for x in range(4)]
    assert row[0] == 0 and row[2] == 255
    assert abs(row[1] - 128) <= 1  # mid-grey stays mid-grey
    assert abs(row[3] - 64) <= 1


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    _noise(80, 64).save(path, "JPEG", exif=exif.tobytes())
    result = decode_image(path)
    image = _assert_rgb(result)
    assert (result.width, result.height) == (80, 64)  # as stored
    assert image.size == (64, 80)  # as displayed
    assert "exif_transposed" in result.repairs
    assert "exif" not in image.info  # stale orientation must not be re-applied later


@pytest.mark.parametrize("mode", ["L", "1", "RGB"])
def test_plain_modes_need_no_repairs(mode: str) -> None:
    result = decode_image(_encode(_noise().convert(mode), "PNG"))
    _assert_rgb(result)
    assert result.repairs == []
    assert result.mode == mode


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_allowed_formats_decode(fmt: str) -> None:
    result = decode_image(_encode(_noise(), fmt))
    assert _assert_rgb(result).size == (80, 64)
    assert result.format == fmt


def test_decoded_image_is_detached_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    _noise().save(path)
    result = decode_image(path)
    path.unlink()
    assert image_to_array(_assert_rgb(result)).shape == (64, 80, 3)


# --------------------------------------------------------------------------- geometry


def test_check_geometry() -> None:
    assert check_geometry(512, 512, min_side=256, max_aspect_ratio=2.0) is None
    assert check_geometry(200, 512, min_side=256) is RejectReason.TOO_SMALL
    assert check_geometry(1000, 300, max_aspect_ratio=3.0) is RejectReason.BAD_ASPECT_RATIO
    assert check_geometry(300, 1000, max_aspect_ratio=3.0) is RejectReason.BAD_ASPECT_RATIO
    assert check_geometry(0, 10) is RejectReason.TOO_SMALL


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (100, 100), (37, 1001), (20, 30)])
def test_center_crop_resize_shape(w: int, h: int) -> None:
    out = center_crop_resize(_noise(w, h), 64)
    assert out.size == (64, 64)
    assert out.mode == "RGB"


def test_center_crop_resize_keeps_the_center() -> None:
    # A wide image: red left third, green middle third, blue right third.
    im = Image.new("RGB", (300, 100), "green")
    im.paste((255, 0, 0), (0, 0, 100, 100))
    im.paste((0, 0, 255), (200, 0, 300, 100))
    out = center_crop_resize(im, 50)
    assert out.getpixel((25, 25)) == (0, 128, 0)
    assert out.getpixel((2, 25))[1] > 100 and out.getpixel((47, 25))[1] > 100
    with pytest.raises(ValueError):
        center_crop_resize(im, 0)


# --------------------------------------------------------------------------- hashing / encoding


def test_sha256(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(3 * 1024 + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == expected
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=1000) == expected  # chunk boundaries do not matter


def test_png_bytes_are_deterministic_and_metadata_free() -> None:
    a = _noise()
    b = _noise()
    b.info["icc_profile"] = b"fake profile"
    b.info["dpi"] = (300, 300)
    pa, pb = image_to_png_bytes(a), image_to_png_bytes(b)
    assert pa == pb
    assert b"iCCP" not in pb and b"tIME" not in pb and b"tEXt" not in pb
    assert b.info["icc_profile"] == b"fake profile"  # caller's image untouched
    assert np.array_equal(image_to_array(Image.open(io.BytesIO(pa))), image_to_array(a))


def test_image_to_array() -> None:
    arr = image_to_array(Image.new("L", (5, 3), 7))
    assert arr.shape == (3, 5, 3) and arr.dtype == np.uint8
    assert arr.flags.writeable and arr.flags.c_contiguous
    assert int(arr.max()) == 7


# --------------------------------------------------------------------------- quality


def _checkerboard(side: int = 128, cell: int = 4, lo: int = 0, hi: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    board = np.where(((yy // cell) + (xx // cell)) % 2 == 1, hi, lo).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


def test_sharp_checkerboard_is_sharper_than_blurred() -> None:
    from PIL import ImageFilter

    # Mid-grey levels: a pure black/white board is 100% clipped, which the exposure
    # term (rightly) punishes harder than blur.
    sharp = _checkerboard(lo=64, hi=192)
    blurred = image_to_array(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(3)))
    qs, qb = technical_quality(sharp), technical_quality(blurred)
    assert qs["sharpness"] > 10 * qb["sharpness"]
    assert qs["quality"] > qb["quality"]


def test_grey_has_no_colour_and_colour_has_some() -> None:
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    q = technical_quality(grey)
    assert q["colorfulness"] == pytest.approx(0.0, abs=1e-9)
    assert q["sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert q["exposure"] == pytest.approx(1.0, abs=0.01)
    assert technical_quality(image_to_array(_noise()))["colorfulness"] > 50


def test_exposure_penalises_dark_bright_and_clipped() -> None:
    mid = technical_quality(np.full((16, 16, 3), 128, dtype=np.uint8))["exposure"]
    dark = technical_quality(np.full((16, 16, 3), 20, dtype=np.uint8))["exposure"]
    black = technical_quality(np.zeros((16, 16, 3), dtype=np.uint8))["exposure"]
    half_clipped = np.full((16, 16, 3), 128, dtype=np.uint8)
    half_clipped[:8] = 255
    clipped = technical_quality(half_clipped)["exposure"]
    assert mid > dark > black == 0.0
    assert clipped < 0.6 * mid


def test_quality_scores_are_bounded_and_validated() -> None:
    for arr in (_checkerboard(), np.zeros((2, 2, 3), np.uint8), image_to_array(_noise())):
        q = technical_quality(arr)
        assert set(q) == {"sharpness", "colorfulness", "exposure", "quality"}
        assert all(isinstance(v, float) for v in q.values())
        assert 0.0 <= q["exposure"] <= 1.0 and 0.0 <= q["quality"] <= 1.0
        assert q["sharpness"] >= 0 and q["colorfulness"] >= 0
    with pytest.raises(ValueError):
        technical_quality(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        technical_quality(np.zeros((4, 4, 3), np.float32))


# --------------------------------------------------------------------------- fuzz

_SEEDS: list[bytes] = [
    _encode(_noise(24, 16), "PNG"),
    _encode(_noise(24, 16), "JPEG", quality=80),
    _encode(
        Image.new("P", (12, 8), 3),
        "GIF",
        save_all=True,
        append_images=[Image.new("P", (12, 8), 5)],
    ),
    _encode(_noise(24, 16).convert("RGBA"), "WEBP"),
    _encode(_noise(24, 16), "TIFF"),
]


def _check_contract(result: DecodedImage) -> None:
    assert isinstance(result, DecodedImage)
    if result.ok:
        assert result.reason is None
        assert result.image is not None and result.image.mode == "RGB"
        assert result.image.width > 0 and result.image.height > 0
    else:
        assert isinstance(result.reason, RejectReason)
        assert result.image is None
        assert result.detail


_FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@_FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    _check_contract(decode_image(data))


@_FUZZ
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    allow_animated=st.booleans(),
)
def test_fuzz_mutated_images_never_raise(
    seed: bytes, edits: list[tuple[int, int]], cut: int | None, allow_animated: bool
) -> None:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _check_contract(decode_image(bytes(data), DecodePolicy(allow_animated=allow_animated)))
