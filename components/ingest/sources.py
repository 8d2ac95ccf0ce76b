"""Source adapters: where raw files and their captions come from.

A source yields `RawItem`s (bytes plus caption metadata) and a fingerprint that changes when
its content changes (used as the local cache key). New sources implement `Source`; the spec
string users type (`--source`) is parsed by `parse_source`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    caption_source: str  # "sidecar_txt", "captions_jsonl", "filename" or "none"
    category: str | None  # coarse label when the source has one (Tux Paint: top folder)

    def read(self) -> bytes:
        """The file's bytes (read lazily so sources can stream)."""
        return Path(self.source_path).read_bytes()


def _read_caption_text(path: Path) -> str:
    """First non-empty line of a caption file; bytes that are not UTF-8 are replaced, not fatal."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


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
        captions: dict[str, str] = {}
        if not path.is_file():
            return captions
        for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SourceError(
                    f"{path}:{number}: expected a JSON object with 'file' and 'caption' ({error})"
                ) from None
        return captions

    def _candidates(self) -> Iterator[Path]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path.suffix.lower() not in _SIDECAR_SUFFIXES and not path.name.startswith("."):
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


def parse_source(spec: str) -> Source:
    """Build a source from its spec: `tuxpaint`, `tuxpaint:<dir>`, `folder:<dir>` or `<dir>`."""
    kind, _, argument = spec.partition(":")
    if kind == "tuxpaint":
        return TuxPaintSource(Path(argument)) if argument else TuxPaintSource()
    if kind == "folder":
        if not argument:
            raise SourceError("folder source needs a path: folder:<dir>")
        return FolderSource(Path(argument))
    if kind == "s3":
        raise SourceError(f"{spec}: S3 sources are not supported yet; sync to a folder and use folder:<dir>")
    if Path(spec).is_dir():
        return FolderSource(Path(spec))
    raise SourceError(f"unknown source {spec!r}: use tuxpaint, tuxpaint:<dir>, folder:<dir> or an existing directory")
