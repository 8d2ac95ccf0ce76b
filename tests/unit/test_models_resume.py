"""Exact resume in Lightning: step-indexed batches, safetensors checkpoints, RNG and EMA restored."""

from __future__ import annotations

import os

import lightning
import pytest
import torch

from models.checkpoint import CHECKPOINT_TENSORS_FILE, list_training_checkpoints, load_weights
from models.flow import FlowMatchingConfig
from models.resume import PeriodicCheckpoint, SafetensorsCheckpointIO, capture_rng_state, restore_rng_state
from models.training import FlowMatchingModule, GroupSpec, OptimConfig, StepPlan
from tests.unit.test_models_training import CONFIG, ToySteps, _step_loader

pytestmark = pytest.mark.usefixtures("single_thread")


def test_weighted_plan_balances_concepts_and_still_resumes_exactly():
    # 90 samples of one concept, 10 of another; 1/sqrt(size) weights (as curation writes them).
    weights = tuple([1 / 90**0.5] * 90 + [1 / 10**0.5] * 10)
    plan = StepPlan([GroupSpec("image", 100, weights)], {"image": 10}, seed=3)
    drawn = torch.tensor(sum((plan.step(t)[0][1] for t in range(400)), []))
    rare_share = float((drawn >= 90).float().mean())
    assert 0.2 < rare_share < 0.3  # ~sqrt(10) / (sqrt(90) + sqrt(10)) = 0.25, vs 0.10 uniform
    again = StepPlan([GroupSpec("image", 100, weights)], {"image": 10}, seed=3)
    assert [again.step(t) for t in range(37, 42)] == [plan.step(t) for t in range(37, 42)]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    restore_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


class _SimulatedCrash(Exception):
    """Stands in for a kill (not KeyboardInterrupt: Lightning turns that into SystemExit)."""


class _Crash(lightning.Callback):
    """Simulates a kill: raises before step `at` starts (after the checkpoint of step `at - 1`)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise _SimulatedCrash(f"before step {self.at}")


def _fit(root, max_steps: int, start_step: int = 0, ckpt_path=None, crash_at: int | None = None) -> FlowMatchingModule:
    """Train the toy task like components.training does: step-indexed batches, periodic checkpoints."""
    torch.backends.mkldnn.deterministic = True
    lightning.seed_everything(0, verbose=False)
    dataset = ToySteps(repeats=7, batch_size=4)  # 14 samples, 4 per step
    loader = _step_loader(dataset, start_step)
    module = FlowMatchingModule(CONFIG, FlowMatchingConfig(), OptimConfig(lr=3e-3, warmup_steps=3, caption_dropout=0.3))
    callbacks = [PeriodicCheckpoint(root, every=2, keep=2)] + ([_Crash(crash_at)] if crash_at else [])
    trainer = lightning.Trainer(accelerator="cpu", precision="32-true", max_steps=max_steps, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                                gradient_clip_val=1.0, callbacks=callbacks, plugins=[SafetensorsCheckpointIO()])
    lightning.seed_everything(1, verbose=False)
    try:
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    except _SimulatedCrash:
        assert crash_at is not None
    return module


def test_crash_and_resume_gives_the_uninterrupted_weights_and_keeps_the_last_k(tmp_path):
    reference = _fit(tmp_path / "a", max_steps=7)
    kept = [p.name for p in list_training_checkpoints(tmp_path / "a")]
    assert kept == ["step-00000006", "step-00000007"]  # every 2 steps + the last step, newest 2 kept

    _fit(tmp_path / "b", max_steps=7, crash_at=5)  # dies in the middle of the second epoch
    assert [p.name for p in list_training_checkpoints(tmp_path / "b")] == ["step-00000002", "step-00000004"]
    checkpoint = tmp_path / "b" / "step-00000004"
    assert not any(name.endswith((".ckpt", ".pt")) for name in os.listdir(checkpoint))
    weights = load_weights(checkpoint / CHECKPOINT_TENSORS_FILE)
    assert any(name.startswith("state_dict/ema.") for name in weights)  # EMA, not only the raw model
    assert any(name.startswith("optimizer_states/") for name in weights)

    resumed = _fit(tmp_path / "b", max_steps=7, start_step=4, ckpt_path=checkpoint)
    assert int(resumed.ema_updates) == int(reference.ema_updates) == 7
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
