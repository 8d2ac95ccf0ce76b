"""Model directories on disk: ``model.safetensors`` + ``config.json`` + ``state.json``.

Weights are only ever read as safetensors: a pickle (``torch.save``) payload can execute code
when loaded, so anything that is not a well-formed safetensors file is refused with
:class:`CheckpointError`. Every file is written atomically (temp file in the same directory,
fsync, ``os.replace``) so a crash never leaves a half-written file under the final name;
``state.json`` is written last, so its presence marks a complete directory.

Training checkpoints (for exact resume) use the same rules: a checkpoint is a directory
``step-<N>/`` holding every tensor of the state (weights, EMA, optimizer moments, RNG state)
in ``tensors.safetensors`` and everything else (loop counters, scheduler state, hyper-
parameters) as a JSON skeleton in ``checkpoint.json``. The directory is written under a
temporary name, fsynced and renamed, and ``checkpoint.json`` (with the tensor file's size and
sha256) is written last, so an interrupted write never yields a checkpoint that loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"

CHECKPOINT_TENSORS_FILE = "tensors.safetensors"
CHECKPOINT_STATE_FILE = "checkpoint.json"  # written last: its presence marks a complete checkpoint
CHECKPOINT_FORMAT = "reelforge-training-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")

# A safetensors header is JSON; anything claiming more than this is corrupt, not a real model.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(Exception):
    """A model directory or weights file is missing, malformed, or not safetensors."""


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; best effort on platforms that cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write bytes to path so readers see either the old file or the complete new one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def _json_bytes(data: dict[str, Any], what: str) -> bytes:
    """Serialise a dict as stable, human-readable JSON, or explain which file could not be."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} must be a dict, got {type(data).__name__}")
    try:
        return (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serialisable: {exc}") from exc


def _prepare_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; storage shared between entries is cloned (safetensors forbids aliasing)."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"weights must map str to Tensor, got {name!r}: {type(tensor).__name__}")
        if tensor.is_meta:
            raise CheckpointError(f"weight {name!r} is on the meta device and has no data to save")
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen_storages:
            t = t.clone()
        elif t.numel():
            seen_storages.add(storage)
        prepared[name] = t
    return prepared


def save_weights(path: str | os.PathLike[str], weights: dict[str, torch.Tensor]) -> Path:
    """Write one safetensors file atomically (e.g. the autoencoder that a generator directory carries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, save(_prepare_weights(weights), metadata={"format": "pt"}))
    return path


def save_model_dir(
    directory: str | os.PathLike[str],
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write weights, config and state into directory (created if needed); returns the directory path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_bytes = _json_bytes(config, CONFIG_FILE)
    state_bytes = _json_bytes(state, STATE_FILE)
    weights_bytes = save(_prepare_weights(weights), metadata={"format": "pt"})
    _atomic_write(directory / WEIGHTS_FILE, weights_bytes)
    _atomic_write(directory / CONFIG_FILE, config_bytes)
    _atomic_write(directory / STATE_FILE, state_bytes)
    return directory


def _check_safetensors_header(path: Path) -> None:
    """Cheap structural checks that give a clear reason before the safetensors parser runs."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    # A safetensors file is an 8-byte little-endian header length, then JSON: recognise that first,
    # because a header length whose low byte is 0x80 would otherwise look like a pickle's first byte.
    looks_like_safetensors = size >= 9 and head[8:9] == b"{" and \
        8 + struct.unpack("<Q", head[:8])[0] <= min(size, 8 + _MAX_HEADER_BYTES)
    if not looks_like_safetensors and head[:1] == b"\x80":
        raise CheckpointError(f"{path}: file is a pickle (protocol marker 0x80); pickle payloads are refused")
    if not looks_like_safetensors and head[:2] == b"PK":
        raise CheckpointError(
            f"{path}: file is a zip archive (torch.save format, which wraps a pickle); pickle payloads are refused"
        )
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path}: safetensors header claims {header_len} bytes but the file has {size} "
            "(truncated or not safetensors)"
        )
    if head[8:9] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)")


def load_weights(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a name->tensor dict, refusing anything else with CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file does not exist")
    _check_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt): {exc}") from exc


def load_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON object file or raise CheckpointError saying what is wrong with it (missing, not JSON,
    not an object)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (incomplete model directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_model_dir(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read (weights, config, state) written by :func:`save_model_dir`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory does not exist")
    state = load_json_object(directory / STATE_FILE)
    config = load_json_object(directory / CONFIG_FILE)
    weights = load_weights(directory / WEIGHTS_FILE, device=device)
    return weights, config, state


# ---------------------------------------------------------------------------------------------
# Training checkpoints: nested state (e.g. a Lightning checkpoint dict) as safetensors + JSON.
# ---------------------------------------------------------------------------------------------

# One-key JSON objects with these keys stand for values JSON has no type for. A real dict that
# happens to look like one is written in the "__items__" form, so decoding is never ambiguous.
_TENSOR, _TUPLE, _FLOAT, _ITEMS = "__tensor__", "__tuple__", "__float__", "__items__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _FLOAT, _ITEMS})


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state into a JSON-able skeleton and a name->tensor dict (inverse: :func:`unflatten_state`).

    Supports dicts (any JSON-able keys), lists, tuples, str, int, float (incl. nan/inf), bool,
    None and tensors. Anything else raises CheckpointError naming where it sits: storing it
    would need pickle, which these checkpoints never use.
    """
    tensors: dict[str, torch.Tensor] = {}

    def tensor_name(path: str) -> str:
        name, n = path or "value", 1
        while name in tensors:  # e.g. keys 1 and "1" in one dict
            n += 1
            name = f"{path}#{n}"
        return name

    def encode(value: Any, path: str, key: bool = False) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {_FLOAT: repr(value)}
        if isinstance(value, torch.Tensor):
            if key:
                raise CheckpointError(f"checkpoint state at {path!r}: a tensor cannot be a dict key")
            name = tensor_name(path)
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{path}/{i}", key) for i, v in enumerate(value)]}
        if key:
            raise CheckpointError(f"checkpoint state at {path!r}: dict keys of type {type(value).__name__} "
                                  "are not supported")
        if isinstance(value, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _MARKERS)
            if plain:
                return {k: encode(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            return {_ITEMS: [[encode(k, f"{path}/<key>", key=True), encode(v, f"{path}/{k}" if path else str(k))]
                             for k, v in value.items()]}
        raise CheckpointError(
            f"checkpoint state at {path or '<root>'!r}: {type(value).__module__}.{type(value).__qualname__} "
            "cannot be stored without pickle; convert it to tensors, numbers, strings, lists or dicts"
        )

    return encode(state, ""), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the state that :func:`flatten_state` split into `skeleton` and `tensors`."""

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (marker, inner), = value.items()
            if marker == _TENSOR:
                if inner not in tensors:
                    raise CheckpointError(f"checkpoint skeleton refers to tensor {inner!r}, "
                                          "which is not in the tensor file")
                return tensors[inner]
            if marker == _TUPLE:
                return tuple(decode(v) for v in inner)
            if marker == _FLOAT:
                return float(inner)
            if marker == _ITEMS:
                return {decode(k): decode(v) for k, v in inner}  # tuple keys come back as tuples
        return {k: decode(v) for k, v in value.items()}

    return decode(skeleton)


def _write_synced(path: Path, payload: bytes) -> None:
    """Write a new file and fsync it before returning (it is renamed into place later)."""
    with path.open("xb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def checkpoint_step(directory: str | os.PathLike[str]) -> int | None:
    """The step in a checkpoint directory's name (``step-000120`` -> 120), None for other names."""
    match = _CHECKPOINT_NAME.match(Path(directory).name)
    return int(match.group(1)) if match else None


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint for `step` (zero-padded so names sort by step)."""
    return f"step-{int(step):08d}"


def save_training_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` as a checkpoint directory, atomically; returns the directory.

    Tensors go to ``tensors.safetensors``, the rest to ``checkpoint.json`` (last, with the
    tensor file's size and sha256). Both are written into a temporary sibling directory, fsynced,
    and the directory is renamed into place: readers see no checkpoint or a complete one. An
    existing directory of the same name (an earlier, possibly damaged, write) is replaced.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten_state(state)
    payload = save(_prepare_weights(tensors), metadata={"format": "pt"})
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensors": {"file": CHECKPOINT_TENSORS_FILE, "bytes": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest()},
        "state": skeleton,
    }
    try:
        record_bytes = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:  # flatten_state should make this unreachable
        raise CheckpointError(f"{directory}: checkpoint state is not JSON-serialisable: {exc}") from exc
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(temp, 0o755)  # mkdtemp makes it private; checkpoints are ordinary files
        _write_synced(temp / CHECKPOINT_TENSORS_FILE, payload)
        _write_synced(temp / CHECKPOINT_STATE_FILE, record_bytes)
        _fsync_directory(temp)
        if directory.exists():
            # rename() cannot replace a non-empty directory; move the old one out of the way first.
            _discard(directory)
        os.rename(temp, directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_directory(directory.parent)
    return directory


def _discard(directory: Path) -> None:
    """Remove a directory so that it vanishes from listings at once (rename), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".trash", dir=directory.parent))
    os.rename(directory, trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)


def remove_training_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Delete a checkpoint directory; a kill half-way leaves nothing that looks like a checkpoint."""
    directory = Path(directory)
    if directory.exists():
        _discard(directory)
        _fsync_directory(directory.parent)


def _read_checkpoint_record(directory: Path) -> dict[str, Any]:
    """checkpoint.json of a complete checkpoint, or CheckpointError saying why it is not one."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not (directory / CHECKPOINT_STATE_FILE).is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {CHECKPOINT_STATE_FILE}; interrupted write?)")
    record = load_json_object(directory / CHECKPOINT_STATE_FILE)
    if record.get("format") != CHECKPOINT_FORMAT or record.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{directory / CHECKPOINT_STATE_FILE}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file"
        )
    if not isinstance(record.get("tensors"), dict) or record["tensors"].get("file") != CHECKPOINT_TENSORS_FILE:
        raise CheckpointError(f"{directory / CHECKPOINT_STATE_FILE}: missing or unexpected tensor file entry")
    return record


def verify_training_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint without loading its tensors; returns its JSON record.

    Refuses (CheckpointError, naming the file) a missing completion record, a tensor file that
    is a pickle or zip, and one whose size or sha256 differs from the record (truncated, torn or
    replaced).
    """
    directory = Path(directory)
    record = _read_checkpoint_record(directory)
    path = directory / CHECKPOINT_TENSORS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: tensor file is missing")
    _check_safetensors_header(path)
    expected = record["tensors"]
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise CheckpointError(f"{path}: {size} bytes, but {CHECKPOINT_STATE_FILE} records {expected.get('bytes')} "
                              "(truncated or replaced)")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.get("sha256"):
        raise CheckpointError(f"{path}: sha256 differs from the one in {CHECKPOINT_STATE_FILE} (corrupt)")
    return record


def load_training_checkpoint(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the state written by :func:`save_training_checkpoint`, after :func:`verify_training_checkpoint`."""
    directory = Path(directory)
    record = verify_training_checkpoint(directory)
    tensors = load_weights(directory / CHECKPOINT_TENSORS_FILE, device=device)
    state = unflatten_state(record["state"], tensors)
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory / CHECKPOINT_STATE_FILE}: state is {type(state).__name__}, expected a dict")
    return state


def read_checkpoint_state(directory: str | os.PathLike[str]) -> Any:
    """The JSON part of a checkpoint's state (tensors left as ``{"__tensor__": name}`` references); cheap."""
    return _read_checkpoint_record(Path(directory))["state"]


def list_training_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories under root (``step-N``; temporaries excluded), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def iter_valid_checkpoints(root: str | os.PathLike[str]) -> Iterator[tuple[Path, CheckpointError | None]]:
    """Newest first: each checkpoint directory with None if it verifies, else the reason it does not."""
    for directory in reversed(list_training_checkpoints(root)):
        try:
            verify_training_checkpoint(directory)
        except CheckpointError as exc:
            yield directory, exc
        else:
            yield directory, None


def latest_training_checkpoint(root: str | os.PathLike[str]) -> tuple[Path | None, list[CheckpointError]]:
    """The newest checkpoint that verifies (None if there is none) and why newer ones were skipped."""
    skipped: list[CheckpointError] = []
    for directory, problem in iter_valid_checkpoints(root):
        if problem is None:
            return directory, skipped
        skipped.append(problem)
    return None, skipped


def prune_training_checkpoints(root: str | os.PathLike[str], keep: int) -> list[Path]:
    """Keep the `keep` newest checkpoints, delete older ones and leftover temporaries; returns what was deleted.

    Call it only while no other process writes to `root` (one trainer per checkpoint directory):
    a temporary directory may be another writer's checkpoint in progress.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    checkpoints = list_training_checkpoints(root)
    doomed = checkpoints[: max(0, len(checkpoints) - keep)]
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step-")
                   and p.name.endswith((".tmp", ".trash"))]
    for directory in doomed:
        if checkpoint_step(directory) is not None:
            remove_training_checkpoint(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return doomed
