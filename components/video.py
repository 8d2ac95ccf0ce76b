"""Video I/O: container sniffing, probing, bounded frame decoding and mp4 encoding.

This is the one module that imports PyAV. Every failure a video file can cause (empty,
garbage, truncated, absurd frame size, no video stream, no decoder) comes out as a
:class:`VideoError` carrying a stable :class:`~components.media.RejectReason`, so curation
records a row instead of crashing, exactly as :func:`components.media.decode_image` does
for images.

Safety: bytes are handed to FFmpeg only after :func:`is_video` recognised an mp4/mov,
Matroska/WebM or AVI header, and always through a Python file object, never a path
string. That keeps FFmpeg's playlist/``concat:``/URL demuxers (which open other files or
the network) out of reach of whatever a dataset contains.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Final

import av
import numpy as np

from components.media import RejectReason

__all__ = [
    "MAX_FRAME_PIXELS",
    "VideoError",
    "VideoInfo",
    "decode_frames",
    "encode_mp4",
    "is_video",
    "probe_video",
]

# A 8K frame is 33 Mpx; anything past 40 Mpx per frame is either corrupt or an attack,
# and one RGB frame of it would already be 120 MB.
MAX_FRAME_PIXELS: Final[int] = 40_000_000
# A partial decode is only worth keeping when it covers this much of the video.
MIN_PARTIAL_SECONDS: Final[float] = 1.0
# When the source frame rate is missing or nonsense, assume this for timestamps.
_FALLBACK_FPS: Final[float] = 25.0
_MAX_PLAUSIBLE_FPS: Final[float] = 1000.0

# ISO-BMFF brands that mean "still image (sequence)", not video: HEIF/HEIC and AVIF
# share the mp4 box structure and 'ftyp' magic.
_IMAGE_BRANDS: Final[frozenset[bytes]] = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1", b"avif", b"avis", b"avio"}
)
# Old QuickTime files may start with one of these atoms instead of 'ftyp'.
_QUICKTIME_FIRST_ATOMS: Final[frozenset[bytes]] = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_EBML_MAGIC: Final[bytes] = b"\x1a\x45\xdf\xa3"
# Demuxers FFmpeg may pick for the containers is_video admits (names as av reports them).
_ALLOWED_DEMUXERS: Final[tuple[str, ...]] = ("mov", "mp4", "matroska", "webm", "avi")


class VideoError(ValueError):
    """A video could not be probed or decoded; ``reason`` says why in a stable code."""

    def __init__(self, reason: RejectReason, source: str, detail: str) -> None:
        super().__init__(f"{source}: {reason.value}: {detail}")
        self.reason = reason
        self.source = source
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says about the first video stream."""

    width: int  # coded width in pixels
    height: int  # coded height in pixels
    fps: float  # average frame rate (frames per second); 0.0 when the header has none
    duration_s: float  # stream duration, or the container's when the stream has none
    frames: int  # frame count from the header, else round(duration_s * fps): an estimate
    codec: str  # FFmpeg decoder name, e.g. "h264", "vp9"


def is_video(data: bytes) -> bool:
    """True when ``data`` starts like an mp4/mov, Matroska/WebM or AVI file.

    Only the first bytes are looked at (16 are enough for mp4/AVI/WebM; more lets mp4
    compatible brands be checked). HEIF/HEIC/AVIF files share mp4's 'ftyp' box but are
    images, so a file whose major or compatible brands name an image format is not a
    video. Audio-only mp4/webm files pass this check and fail later in
    :func:`probe_video` for having no video stream.
    """
    head = bytes(data[:64])
    if len(head) < 12:
        return False
    if head.startswith(_EBML_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return True
    box_type = head[4:8]
    if box_type == b"ftyp":
        box_size = struct.unpack(">I", head[:4])[0]
        brands_end = min(max(box_size, 16), len(head))
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, brands_end - 3, 4)}
        return not (brands & _IMAGE_BRANDS)
    return box_type in _QUICKTIME_FIRST_ATOMS


def probe_video(
    data: bytes | Path,
    *,
    source: str,
    max_bytes: int | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> VideoInfo:
    """Read the container header of ``data`` (bytes or a file path) without decoding frames.

    Raises :class:`VideoError` with ``EMPTY_FILE``, ``FILE_TOO_LARGE`` (over
    ``max_bytes``), ``UNREADABLE`` (not a recognised video container, or garbage),
    ``TRUNCATED`` (an mp4 whose boxes run past the end of the file, e.g. the index box
    was cut off), ``UNSUPPORTED_FORMAT`` (an image container, no video stream, or no
    decoder for the codec) or ``DECOMPRESSION_BOMB`` (declared frame over
    ``max_pixels``). No other exception escapes.
    """
    with _open_container(data, source=source, max_bytes=max_bytes) as container:
        stream = _first_video_stream(container, source)
        return _info(container, stream, source=source, max_pixels=max_pixels)


def decode_frames(
    data: bytes | Path,
    *,
    fps: float,
    max_side: int,
    max_seconds: float,
    source: str,
    max_bytes: int | None = None,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> tuple[np.ndarray, float]:
    """Decode ``data`` to RGB frames resampled to ``fps``, long side at most ``max_side``.

    Returns ``(frames, fps_used)``: ``frames`` is ``uint8 [T, H, W, 3]``. ``fps_used`` is
    ``min(fps, source fps)``: a 10 fps source is not padded with repeated frames to
    reach 24. Output frame ``k`` is the source frame whose timestamp (relative to the
    first frame) is nearest to ``k / fps_used``; ties go to the earlier frame. Only
    timestamps below ``max_seconds`` are produced, and decoding stops there, so memory
    is bounded by ``ceil(max_seconds * fps_used)`` frames of at most ``max_side`` on the
    long side. Display rotation (phone videos) and non-square pixels are applied, so
    frames look the way a player shows them.

    A file whose decoding fails part-way, or ends well before its declared duration,
    returns the frames decoded so far when they cover at least
    :data:`MIN_PARTIAL_SECONDS`, else raises ``TRUNCATED``. Every failure is a
    :class:`VideoError` (reasons as :func:`probe_video`), never a raw PyAV exception.
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"{source}: fps must be a positive number, got {fps}")
    if max_side < 1:
        raise ValueError(f"{source}: max_side must be >= 1, got {max_side}")
    if not max_seconds > 0:
        raise ValueError(f"{source}: max_seconds must be positive, got {max_seconds}")

    with _open_container(data, source=source, max_bytes=max_bytes) as container:
        stream = _first_video_stream(container, source)
        info = _info(container, stream, source=source, max_pixels=max_pixels)
        source_fps = info.fps if 0 < info.fps <= _MAX_PLAUSIBLE_FPS else _FALLBACK_FPS
        fps_used = min(float(fps), source_fps)
        # Frame threads make H.264 decoding ~2x faster on two cores; output is identical.
        stream.thread_type = "AUTO"
        sar = stream.sample_aspect_ratio

        frames: list[np.ndarray] = []
        # (frame, rgb) of the last conversion: holding the frame keeps the identity check
        # valid (PyAV reuses freed frame objects, so ids alone would alias).
        converted: list[tuple[av.VideoFrame, np.ndarray]] = []
        failure: str | None = None
        previous: tuple[av.VideoFrame, float] | None = None
        first_time: float | None = None
        last_time = -math.inf
        next_index = 0

        def target(index: int) -> float:
            return index / fps_used

        def emit(frame: av.VideoFrame) -> None:
            # Upsampling repeats a source frame; convert it once.
            if not converted or converted[0][0] is not frame:
                rgb = _to_rgb(frame, max_side=max_side, sar=sar, source=source, max_pixels=max_pixels)
                converted[:] = [(frame, rgb)]
            frames.append(converted[0][1])

        try:
            for frame in container.decode(stream):
                raw_time = frame.time
                if raw_time is None or not math.isfinite(raw_time):
                    time = last_time + 1.0 / source_fps if previous is not None else 0.0
                else:
                    if first_time is None:
                        first_time = raw_time
                    time = raw_time - first_time
                if time <= last_time:
                    # Duplicate or backwards timestamps (corrupt files): keep the first.
                    continue
                while next_index < math.ceil(max_seconds * fps_used) and target(next_index) <= time:
                    wanted = target(next_index)
                    if previous is not None and wanted - previous[1] <= time - wanted:
                        emit(previous[0])
                    else:
                        emit(frame)
                    next_index += 1
                previous = (frame, time)
                last_time = time
                if time >= max_seconds:
                    break
        except VideoError:
            raise
        except Exception as exc:  # noqa: BLE001 - FFmpeg errors, MemoryError, odd PyAV errors on corrupt data
            failure = f"decoding failed after {len(frames)} frames: {type(exc).__name__}: {exc}"

        covered = 0.0
        if previous is not None:
            # The last frame is on screen until one source frame interval after its timestamp.
            end = min(previous[1] + 1.0 / source_fps, max_seconds)
            while next_index < math.ceil(max_seconds * fps_used) and target(next_index) < end:
                emit(previous[0])
                next_index += 1
            covered = end
        if not frames:
            raise VideoError(RejectReason.TRUNCATED, source, failure or "no frame could be decoded")
        expected = min(info.duration_s, max_seconds)
        ended_early = expected > 0 and covered < 0.9 * expected - 1.0 / source_fps
        if (failure or ended_early) and covered < MIN_PARTIAL_SECONDS:
            why = failure or f"decoded {covered:.2f} s of a declared {info.duration_s:.2f} s"
            raise VideoError(RejectReason.TRUNCATED, source, f"{why}; less than {MIN_PARTIAL_SECONDS} s usable")
        # Frames can change size mid-stream; curation needs one shape per video.
        height, width = frames[0].shape[:2]
        frames = [f if f.shape[:2] == (height, width) else _resize(f, width, height) for f in frames]
        return np.stack(frames), fps_used


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """Encode ``uint8 [T, H, W, 3]`` RGB frames as H.264 (libx264, yuv420p) in mp4.

    yuv420p needs even dimensions, so an odd height/width loses its last row/column.
    The output is byte-identical for the same input on the same PyAV/FFmpeg/x264 build:
    the muxer and encoder run with ``bitexact`` flags (no version strings or creation
    times in the file) and x264 with one thread (its output depends on the thread
    count). A test checks this. Quality is CRF 18 (visually lossless for curation).
    """
    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise ValueError(f"expected uint8 frames of shape [T, H, W, 3], got {array.dtype} {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("cannot encode a video with zero frames")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    height = array.shape[1] - array.shape[1] % 2
    width = array.shape[2] - array.shape[2] % 2
    if height < 2 or width < 2:
        raise ValueError(f"frames must be at least 2x2 pixels, got {array.shape[2]}x{array.shape[1]}")
    array = np.ascontiguousarray(array[:, :height, :width])

    rate = Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = {"crf": "18", "preset": "medium", "threads": "1"}
        for index, rgb in enumerate(array):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


# --- internals -------------------------------------------------------------------------


@contextmanager
def _open_container(
    data: bytes | Path, *, source: str, max_bytes: int | None
) -> Iterator[av.container.InputContainer]:
    """Open ``data`` for demuxing after the size and magic checks; map every failure to VideoError."""
    file: IO[bytes]
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            size = path.stat().st_size
            file = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise VideoError(RejectReason.UNREADABLE, source, f"cannot open: {exc}") from exc
    else:
        size = len(data)
        file = io.BytesIO(data)
    try:
        if size == 0:
            raise VideoError(RejectReason.EMPTY_FILE, source, "zero bytes")
        if max_bytes is not None and size > max_bytes:
            raise VideoError(RejectReason.FILE_TOO_LARGE, source, f"{size} bytes exceeds limit of {max_bytes}")
        head = file.read(64)
        file.seek(0)
        if not is_video(head):
            if head[4:8] == b"ftyp":
                raise VideoError(RejectReason.UNSUPPORTED_FORMAT, source, "an image (HEIF/AVIF) container, not a video")
            raise VideoError(RejectReason.UNREADABLE, source, "not a recognised video container (mp4/mov, webm/mkv, avi)")
        try:
            container = av.open(file, mode="r")
        except Exception as exc:  # noqa: BLE001 - InvalidDataError, EOFError, ValueError on garbage headers
            reason = RejectReason.TRUNCATED if _mp4_boxes_run_past_end(file, size) else RejectReason.UNREADABLE
            raise VideoError(reason, source, f"cannot open container: {type(exc).__name__}: {exc}") from exc
        try:
            if container.format.name.split(",")[0] not in _ALLOWED_DEMUXERS:
                raise VideoError(
                    RejectReason.UNSUPPORTED_FORMAT, source, f"container {container.format.name} is not allowed"
                )
            yield container
        finally:
            container.close()
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: nothing but VideoError leaves this module
        raise VideoError(RejectReason.UNREADABLE, source, f"{type(exc).__name__}: {exc}") from exc
    finally:
        file.close()


def _mp4_boxes_run_past_end(file: IO[bytes], size: int) -> bool:
    """True when the top-level ISO-BMFF boxes of ``file`` declare more bytes than it has.

    That is the signature of a cut-off mp4: its header box is fine but the file stops
    inside a box (commonly mdat), so the index box that follows never arrives.
    """
    try:
        file.seek(0)
        position = 0
        while position + 8 <= size:
            file.seek(position)
            header = file.read(16)
            box_size = struct.unpack(">I", header[:4])[0]
            if box_size == 1 and len(header) >= 16:
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:
                return False  # "extends to end of file": cannot be past the end
            if box_size < 8:
                return False  # not a box structure at all: garbage, not truncation
            position += box_size
        return position > size
    except (OSError, struct.error):
        return False


def _first_video_stream(container: av.container.InputContainer, source: str) -> av.video.stream.VideoStream:
    """The first video stream, or UNSUPPORTED_FORMAT when there is none or no decoder for it."""
    try:
        streams = container.streams.video
    except Exception as exc:  # noqa: BLE001 - PyAV can fail building stream objects for odd codecs
        raise VideoError(RejectReason.UNSUPPORTED_FORMAT, source, f"cannot read streams: {exc}") from exc
    if not streams:
        raise VideoError(RejectReason.UNSUPPORTED_FORMAT, source, "no video stream (audio only or empty)")
    stream = streams[0]
    if stream.codec_context is None or not stream.codec_context.name:
        raise VideoError(RejectReason.UNSUPPORTED_FORMAT, source, "no decoder for the video codec")
    return stream


def _info(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, *, source: str, max_pixels: int
) -> VideoInfo:
    """Header facts of ``stream``, with the pixel limit enforced before any decoding."""
    width, height = int(stream.width or 0), int(stream.height or 0)
    if width <= 0 or height <= 0:
        raise VideoError(RejectReason.UNREADABLE, source, f"the video stream declares no frame size ({width}x{height})")
    if width * height > max_pixels:
        raise VideoError(
            RejectReason.DECOMPRESSION_BOMB,
            source,
            f"{width}x{height} = {width * height} pixels per frame exceeds limit of {max_pixels}",
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not math.isfinite(fps) or fps < 0:
        fps = 0.0
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if duration <= 0 and container.duration is not None:
        duration = container.duration / av.time_base
    if not math.isfinite(duration) or duration < 0:
        duration = 0.0
    frames = int(stream.frames or 0) or round(duration * fps)
    return VideoInfo(
        width=width, height=height, fps=fps, duration_s=duration, frames=frames, codec=stream.codec_context.name
    )


def _output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Keep the aspect ratio, shrink so the longer side is at most ``max_side``; never upscale."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(
    frame: av.VideoFrame, *, max_side: int, sar: Fraction | None, source: str, max_pixels: int
) -> np.ndarray:
    """Convert one decoded frame to display-oriented RGB ``[H, W, 3]`` within ``max_side``."""
    if frame.width * frame.height > max_pixels:
        raise VideoError(
            RejectReason.DECOMPRESSION_BOMB,
            source,
            f"a frame of {frame.width}x{frame.height} exceeds limit of {max_pixels} pixels",
        )
    # Non-square pixels (anamorphic DVD/broadcast): the display width is width * SAR.
    display_width = frame.width * float(sar) if sar and 0.1 < float(sar) < 10 else float(frame.width)
    rotation = int(round((frame.rotation or 0) / 90.0)) % 4
    if rotation % 2:
        # The frame is turned by 90 degrees afterwards, so its display height caps its width.
        height_out, width_out = _output_size(frame.height, round(display_width), max_side)
    else:
        width_out, height_out = _output_size(round(display_width), frame.height, max_side)
    rgb = frame.to_ndarray(format="rgb24", width=width_out, height=height_out, interpolation="AREA")
    if rotation:
        # PyAV reports the angle the display matrix turns the frame counterclockwise;
        # np.rot90 with positive k turns counterclockwise too.
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation))
    return rgb


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an RGB frame (used only when a stream changes resolution mid-way)."""
    import cv2

    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
