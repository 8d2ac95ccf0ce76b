"""Where a training stage keeps its resumable checkpoints, and which run they belong to.

A stage's checkpoints live in ``$REELFORGE_CHECKPOINT_DIR/<stage>/<key>``. The key hashes
everything that determines the training trajectory: the stage's recipe settings (minus the
checkpointing knobs themselves), the dataset content hash, the training subset, the initial
weights (quality-tune) and the training code. A re-run of the same stage on the same inputs
finds the same directory and resumes; any change gives a fresh directory, so a checkpoint is
never resumed into a different run. The directory must outlive the task: KFP gives every
pipeline run new output directories, so ``reelforge run`` points the variable at
``<workdir>/checkpoints``. When it is unset (e.g. a bare ``reelforge pretrain`` call), the
checkpoints go to ``checkpoints/`` next to the stage's output directory. On a cluster, set it to
a persistent volume shared by the retries of a task.

Only this module's light imports are needed to read the variable name (the CLI imports it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from components.storage import code_fingerprint, sha256_json

CHECKPOINT_ENV = "REELFORGE_CHECKPOINT_DIR"
# Bump when the checkpoint contents or the resume logic change incompatibly.
CHECKPOINT_KEY_VERSION = "1"
# Source files whose edits change what training computes: a checkpoint from other code is not resumed.
# (Modules, not packages: a package's fingerprint would cover only its __init__.py.)
TRAINING_CODE = ("models.dit.model", "models.flow", "models.training", "models.resume", "models.latent",
                 "models.autoencoder.model", "models.autoencoder.training", "components.training",
                 "components.train_data", "components.autoencoder.stage")
# Settings that say how to checkpoint, not what to compute: changing them keeps the checkpoints.
_NOT_IN_KEY = ("checkpoint_every", "keep_checkpoints")



def checkpoint_key(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, Any]) -> str:
    """Hex key naming a training run: stage, its recipe settings (JSON-able) and input fingerprints."""
    train = dict(settings.get("train", {}))
    for name in _NOT_IN_KEY:
        train.pop(name, None)
    payload = {
        "version": CHECKPOINT_KEY_VERSION,
        "stage": stage,
        "settings": {**settings, "train": train},
        "inputs": dict(inputs),
        "code": code_fingerprint(TRAINING_CODE),
    }
    return sha256_json(payload)


def checkpoint_root(output_dir: Path) -> Path:
    """The base directory: $REELFORGE_CHECKPOINT_DIR, else ``checkpoints/`` next to `output_dir`."""
    configured = os.environ.get(CHECKPOINT_ENV)
    return Path(configured) if configured else Path(output_dir).resolve().parent / "checkpoints"


def checkpoint_dir(stage: str, key: str, output_dir: Path, description: Mapping[str, Any] | None = None) -> Path:
    """``<root>/<stage>/<key[:16]>``, created, with ``key.json`` saying what the key covers (for people)."""
    directory = checkpoint_root(output_dir) / stage / key[:16]
    directory.mkdir(parents=True, exist_ok=True)
    info = directory / "key.json"
    if description is not None and not info.exists():
        temp = info.with_name(f".key.json.{os.getpid()}.tmp")  # replaced whole, so never half-written
        temp.write_text(json.dumps({"key": key, **description}, indent=2, sort_keys=True, default=str) + "\n",
                        encoding="utf-8")
        os.replace(temp, info)
    return directory


class CheckpointDirectoryBusy(RuntimeError):
    """Another live process is training into the same checkpoint directory."""


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a checkpoint directory while training into it.

    Two writers would prune each other's in-progress checkpoints. This happens when the parent
    `reelforge run` is SIGKILLed but its task process lives on and the command is run again. The
    lock (flock) goes away with its process, however that process dies, so a stale lock never
    blocks a resume. flock is reliable on local filesystems, not necessarily on network ones.
    """
    lock_path = Path(directory) / ".lock"
    handle = lock_path.open("a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise CheckpointDirectoryBusy(
                f"{directory} is in use by another training process (pid {holder}); wait for it to finish "
                "or stop it, then run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
