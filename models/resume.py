"""Exact resume for Lightning training: safetensors checkpoints, periodic saving, RNG state.

- :class:`SafetensorsCheckpointIO` replaces Lightning's pickle ``.ckpt`` format with
  :func:`models.checkpoint.save_training_checkpoint` directories (tensors in safetensors, the
  rest as JSON, written atomically; loading refuses pickles).
- :class:`PeriodicCheckpoint` saves every N optimizer steps and at ``max_steps``, keeps the
  newest K, and carries the global RNG states (torch, python, numpy) so that caption dropout,
  timesteps and noise continue exactly where they stopped.

The data position is not handled here: pair these with a sampler whose batch for step t is a
function of (seed, t) and that starts at the resumed step, e.g. :class:`models.training.StepBatchSampler`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from models.checkpoint import (
    CheckpointError,
    checkpoint_name,
    load_training_checkpoint,
    prune_training_checkpoints,
    remove_training_checkpoint,
    save_training_checkpoint,
)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO that writes checkpoint directories (safetensors + JSON), never pickles."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Write `checkpoint` (Lightning's state dict) as a checkpoint directory at `path`, atomically."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        save_training_checkpoint(path, checkpoint)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint directory; raises CheckpointError for incomplete, corrupt or pickle files.

        `weights_only` is accepted for interface compatibility: nothing here can run code anyway.
        """
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        return load_training_checkpoint(path, device=device)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete a checkpoint directory."""
        remove_training_checkpoint(path)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, python, numpy) in checkpointable types."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(k) for k in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class PeriodicCheckpoint(Checkpoint):
    """Save ``<root>/step-<N>`` every `every` optimizer steps and at ``max_steps``; keep the newest `keep`.

    Use with ``Trainer(plugins=[SafetensorsCheckpointIO()])`` and resume with
    ``trainer.fit(..., ckpt_path=<checkpoint dir>)``. Being a ``Checkpoint`` subclass, Lightning
    runs it after the other callbacks' ``on_train_batch_end``. The module's own
    ``on_train_batch_end`` still runs after it, so per-step state updated there would be missed;
    update such state in ``optimizer_step`` (as :class:`models.training.FlowMatchingModule` does
    for its EMA).
    """

    def __init__(self, root: str | os.PathLike[str], every: int, keep: int = 2) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.every, self.keep = Path(root), every, keep
        self.saved: list[Path] = []  # checkpoints written by this run, in order
        self.last_train_loss: float | None = None  # of the last saved step; restored on resume
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_saved_step = -1

    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        """Refuse set-ups where 'one batch = one step' does not hold (the data position relies on it)."""
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("PeriodicCheckpoint supports accumulate_grad_batches=1 only")

    def on_train_batch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """On the first batch after a resume, put the RNGs back where the checkpointed run had them."""
        # As late as possible: model construction, dataloader set-up, etc. draw from the global
        # RNG in the resumed process but not between the checkpoint and the next step originally.
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Save when the step is a multiple of `every` or the last one, then prune to `keep`."""
        step = trainer.global_step
        if step == self._last_saved_step or not (step % self.every == 0 or step == trainer.max_steps):
            return
        loss = trainer.callback_metrics.get("train/loss")
        self.last_train_loss = float(loss) if loss is not None else None
        self._save(trainer)

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Re-save the step's checkpoint when a validation ran right after it was written.

        Lightning validates after the batch-end hooks, so the checkpoint of a step that is also a
        validation point would miss what that validation changed in other callbacks (early
        stopping's counters, weight-averaging snapshots); a run resumed from it would then
        diverge from one that was never interrupted. Being a ``Checkpoint``, this runs after
        those callbacks' own ``on_validation_end``.
        """
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_step != self._last_saved_step:
            return
        self._save(trainer)

    def _save(self, trainer: lightning.Trainer) -> None:
        """Write ``<root>/step-<N>`` for the current step and prune to the newest `keep`."""
        step = trainer.global_step
        path = self.root / checkpoint_name(step)
        # weights_only=False: the full training state (optimizer, loops, callbacks); also silences
        # Lightning's "weights_only was not set" message on every save.
        trainer.save_checkpoint(path, weights_only=False)  # -> state_dict() below + the CheckpointIO plugin
        self._last_saved_step = step
        if path not in self.saved:
            self.saved.append(path)
        if trainer.is_global_zero:  # under DDP only rank 0 writes checkpoints, so only it prunes them
            prune_training_checkpoints(self.root, self.keep)

    def state_dict(self) -> dict[str, Any]:
        """What this callback adds to a checkpoint: RNG states at save time and the step's train loss."""
        return {"rng": capture_rng_state(), "train_loss": self.last_train_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the RNG states to restore at the first resumed batch."""
        if "rng" not in state_dict:
            raise CheckpointError("checkpoint has no RNG state; it cannot be resumed exactly")
        self._rng_to_restore = state_dict["rng"]
        self.last_train_loss = state_dict.get("train_loss")
