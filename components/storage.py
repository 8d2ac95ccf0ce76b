"""Dataset artifacts on disk: Parquet manifests, WebDataset tar shards and content hashes.

A dataset artifact is a directory holding ``manifest.parquet`` (one row per sample) and tar
shards in WebDataset layout (``<key>.<ext>`` members grouped by key, in order), so that the
same directory streams into a training job, versions cheaply with DVC (a few big files rather
than thousands of small ones), and copies as one unit between KFP tasks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.media import sha256_file

MANIFEST = "manifest.parquet"


def write_manifest(frame: pd.DataFrame, directory: Path, name: str = MANIFEST) -> Path:
    """Write a manifest as Parquet, atomically (a crash never leaves half a manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    temp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(temp, index=False)
    os.replace(temp, path)
    return path


def read_manifest(directory: Path, name: str = MANIFEST) -> pd.DataFrame:
    """Read a dataset's manifest, with an error that says which directory lacks one."""
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a reelforge dataset: {name} is missing")
    return pd.read_parquet(path)


@dataclass(frozen=True)
class ShardSample:
    """One sample read back from a shard: its key and its members by extension."""

    key: str
    members: dict[str, bytes]


class ShardWriter:
    """Writes samples into numbered tar shards of at most `shard_size` samples each.

    Members are written with fixed metadata (mtime 0, uid 0, sorted order inside a sample)
    so the same samples always produce byte-identical shards: DVC and KFP caching then see
    an unchanged dataset as unchanged.
    """

    def __init__(self, directory: Path, prefix: str, shard_size: int) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.shard_size = shard_size
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._temp: Path | None = None
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        path = self.directory / f"{self.prefix}-{len(self.paths):05d}.tar"
        self._temp = path.with_suffix(".tar.tmp")
        self._tar = tarfile.open(self._temp, "w", format=tarfile.USTAR_FORMAT)
        self.paths.append(path)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is not None and self._temp is not None:
            self._tar.close()
            os.replace(self._temp, self.paths[-1])
            self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample; returns the shard file name it went into."""
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
        if self._tar is None or self._count >= self.shard_size:
            self._open_next()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(name=f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        return self.paths[-1].name

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard path written."""
        self._close_current()
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_shard(path: Path) -> Iterator[ShardSample]:
    """Yield the samples of one tar shard, grouping consecutive members by key."""
    with tarfile.open(path, "r") as tar:
        key: str | None = None
        members: dict[str, bytes] = {}
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            sample_key, _, ext = name.partition(".")
            if key is not None and sample_key != key:
                yield ShardSample(key, members)
                members = {}
            key = sample_key
            handle = tar.extractfile(info)
            members[ext] = handle.read() if handle else b""
        if key is not None:
            yield ShardSample(key, members)


def iter_shards(paths: Iterable[Path]) -> Iterator[ShardSample]:
    """Yield the samples of several shards in order."""
    for path in paths:
        yield from iter_shard(path)


def shard_paths(directory: Path, prefix: str) -> list[Path]:
    """The shards of one kind in a dataset directory, in order."""
    return sorted(Path(directory).glob(f"{prefix}-*.tar"))


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON-able value with sorted keys: the one way cache and checkpoint keys are made."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint(modules: Iterable[str]) -> dict[str, str]:
    """sha256 of each module's source file, so a key changes when the code that made the data does."""
    out = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"cannot locate module {name} to fingerprint its code")
        out[name] = sha256_file(Path(spec.origin))
    return out


def directory_hash(directory: Path) -> str:
    """Content hash of a dataset directory: sha256 over sorted (relative path, file sha256).

    Reports and other files that change on every run (``report.*``) are left out, so the
    hash names the data itself: the same samples give the same hash on any machine.
    """
    directory = Path(directory)
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel.startswith("report.") or rel.endswith(".tmp"):
            continue
        entries.append({"path": rel, "sha256": sha256_file(path)})
    return sha256_json(entries)


def dataset_hash(directory: Path) -> str:
    """The content hash of a curated dataset (recorded in its report; computed if absent)."""
    report = Path(directory) / "report.json"
    if report.is_file():
        recorded = json.loads(report.read_text(encoding="utf-8")).get("content_hash")
        if recorded:
            return str(recorded)
    return directory_hash(Path(directory))


# --- directories at a URI (s3:// or a local path): how a multi-node TrainJob gets its inputs and
# hands its model back. Endpoint and credentials come from the standard AWS environment
# (AWS_ENDPOINT_URL_S3 / MLFLOW_S3_ENDPOINT_URL for S3-compatible stores, IRSA or keys).

def _s3_location(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (expected s3://<bucket>/<prefix>)")
    return bucket, prefix.strip("/")


def _s3_client() -> Any:
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def download_dir(uri: str, destination: Path) -> Path:
    """Copy every file under `uri` (s3://bucket/prefix, file:// or a path) into `destination`."""
    import shutil

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    if not uri.startswith("s3://"):
        shutil.copytree(_local(uri), destination, dirs_exist_ok=True)
        return destination
    bucket, prefix = _s3_location(uri)
    client, found = _s3_client(), 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):].lstrip("/")
            if not relative:
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            found += 1
    if not found:
        raise FileNotFoundError(f"nothing under {uri}")
    return destination


def upload_dir(source: Path, uri: str) -> int:
    """Copy every file under `source` to `uri` (s3://bucket/prefix, file:// or a path); returns the count."""
    import shutil

    files = [p for p in sorted(Path(source).rglob("*")) if p.is_file()]
    if not uri.startswith("s3://"):
        shutil.copytree(source, _local(uri), dirs_exist_ok=True)
        return len(files)
    bucket, prefix = _s3_location(uri)
    client = _s3_client()
    for path in files:
        key = "/".join(part for part in (prefix, path.relative_to(source).as_posix()) if part)
        client.upload_file(str(path), bucket, key)
    return len(files)
