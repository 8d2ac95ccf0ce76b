"""Where the served model comes from: a model directory, a registry version, or a registry alias that is followed.

    --model-dir DIR              a Model artifact directory (config.json + model.safetensors)
    --model models:/NAME/VERSION one registered version, pinned
    --model models:/NAME@ALIAS   whatever version ALIAS names now, and later: the server polls the alias

A registry version is fetched with `mlflow.artifacts.download_artifacts` from the version's
download URI; the model directory inside it (the pyfunc's `model_dir` artifact: the folder that
holds config.json and model.safetensors) is loaded with `TextToImage.from_dir`, which reads
safetensors only: nothing registered is ever unpickled, the pyfunc's python code is not run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("reelforge.serve")

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$")


class ModelSourceError(Exception):
    """The model spec is malformed, the registry does not know it, or its files do not load."""


@dataclass
class LoadedModel:
    """A generator ready to serve and what it is: registry name/version/alias and lineage tags."""

    generator: Any  # models.generate.TextToImage
    name: str
    version: str
    alias: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the spec it was loaded from

    def describe(self) -> dict[str, Any]:
        """What GET /v1/model answers: identity, lineage and sampling defaults."""
        generator = self.generator
        config = generator.config
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias or None,
            "source": self.source,
            "tags": dict(sorted(self.tags.items())),
            "default_steps": generator.default_steps,
            "default_guidance": generator.default_guidance,
            "distilled": generator.distilled,
            "distill": config.get("distill"),
            "image_size": generator.image_size,
            "latent": (config.get("latent") or {}).get("kind", "pixel"),
            "size_multiple": size_multiple(generator),
            "frame_step": int(generator.codec.temporal_downsample),
        }


def size_multiple(generator: Any) -> int:
    """Width and height must be multiples of this: the codec's spatial downsampling x the patch size."""
    return int(generator.codec.spatial_downsample) * int(generator.model.config.patch_size)


def find_model_dir(root: Path) -> Path:
    """The folder under `root` holding config.json and model.safetensors (the `model_dir` artifact)."""
    root = Path(root)
    candidates = sorted({p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file()},
                        key=lambda p: ("model_dir" not in p.parts, len(p.parts), str(p)))
    if not candidates:
        raise ModelSourceError(f"no model directory (config.json + model.safetensors) under {root}")
    return candidates[0]


class ModelSource:
    """A parsed model spec; `load()` gives a LoadedModel, `latest_version()` says what the alias names now."""

    def __init__(self, spec: str | None = None, model_dir: str | Path | None = None) -> None:
        if (spec is None) == (model_dir is None):
            raise ModelSourceError("give exactly one of --model (models:/NAME@ALIAS or models:/NAME/VERSION) "
                                   "and --model-dir")
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.name = self.version = self.alias = ""
        if spec is not None:
            match = _URI.match(spec.strip())
            if not match:
                raise ModelSourceError(f"--model {spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            self.name, self.version, self.alias = match["name"], match["version"] or "", match["alias"] or ""
        self.spec = spec if spec is not None else str(self.model_dir)

    @property
    def follows_alias(self) -> bool:
        """True when the served version should track a registry alias."""
        return bool(self.alias)

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    def latest_version(self) -> str:
        """The version this spec names now (the alias is resolved in the registry); blocking."""
        if self.model_dir is not None:
            return weights_version(self.model_dir)
        if not self.alias:
            return self.version
        try:
            return str(self._client().get_model_version_by_alias(self.name, self.alias).version)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types; one message names the spec
            raise ModelSourceError(f"{self.spec}: cannot resolve alias {self.alias!r}: {error}") from None

    def load(self, version: str | None = None) -> LoadedModel:
        """Load the model (for an alias: `version`, or what the alias names now); blocking, slow."""
        from models.generate import TextToImage

        if self.model_dir is not None:
            if not (self.model_dir / "config.json").is_file():
                raise ModelSourceError(f"--model-dir {self.model_dir}: no config.json (not a model directory)")
            try:
                generator = TextToImage.from_dir(self.model_dir)
            except Exception as error:  # noqa: BLE001 - bad weights or config: one clear message
                raise ModelSourceError(f"--model-dir {self.model_dir}: does not load: {error}") from error
            config = generator.config
            name = str(config.get("name") or (config.get("recipe") or {}).get("name") or self.model_dir.name)
            return LoadedModel(generator, name, weights_version(self.model_dir), source=self.spec)
        version = version or self.latest_version()
        client = self._client()
        try:
            record = client.get_model_version(self.name, version)
            uri = client.get_model_version_download_uri(self.name, version)
        except Exception as error:  # noqa: BLE001
            raise ModelSourceError(f"models:/{self.name}/{version}: not in the registry: {error}") from None
        import mlflow.artifacts

        scratch = Path(tempfile.mkdtemp(prefix="reelforge-serve-"))
        try:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch))
            except Exception as error:  # noqa: BLE001
                raise ModelSourceError(f"models:/{self.name}/{version}: cannot download {uri}: {error}") from None
            directory = find_model_dir(Path(local))
            try:
                generator = TextToImage.from_dir(directory)  # safetensors only; everything is read into memory
            except Exception as error:  # noqa: BLE001
                raise ModelSourceError(f"models:/{self.name}/{version}: its model_dir does not load: {error}") from error
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return LoadedModel(generator, self.name, str(version), alias=self.alias, tags=dict(record.tags or {}),
                           source=self.spec)


def weights_version(model_dir: Path) -> str:
    """A model directory's version for headers and logs: the first 12 hex digits of its weights' sha256."""
    digest = hashlib.sha256()
    try:
        with open(Path(model_dir) / "model.safetensors", "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise ModelSourceError(f"--model-dir {model_dir}: cannot read model.safetensors: {error}") from None
    return digest.hexdigest()[:12]
