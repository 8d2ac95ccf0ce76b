"""Distillation pieces on tiny random DiTs: student initialisation, nested grids, targets, and a toy run."""

from __future__ import annotations

import lightning
import pytest
import torch

from models.distill import (DistillModule, TeacherEnsemble, frozen_copy, nested_grids, student_blocks,
                            student_from_teacher, two_step_target)
from models.dit import DiTConfig, build
from models.flow import sample
from models.text_encoder import TextEmbeddings
from models.training import GroupSpec, OptimConfig, StepPlan, StepSampler

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = DiTConfig(image_size=8, patch_size=4, width=32, depth=4, heads=2, text_dim=16, max_text_tokens=4)


def _teacher(seed: int, config: DiTConfig = CONFIG):
    """A DiT with random non-zero weights everywhere (adaLN-zero would make it predict exactly 0)."""
    torch.manual_seed(seed)
    model = build(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def _text(batch: int, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, CONFIG.max_text_tokens, dtype=torch.bool)
    mask[:, :3] = True
    tokens = torch.randn(batch, CONFIG.max_text_tokens, CONFIG.text_dim, generator=g) * mask[..., None]
    return TextEmbeddings(tokens, mask, torch.randn(batch, CONFIG.text_dim, generator=g))


def _null() -> TextEmbeddings:
    return TextEmbeddings(torch.zeros(1, CONFIG.max_text_tokens, CONFIG.text_dim),
                          torch.zeros(1, CONFIG.max_text_tokens, dtype=torch.bool), torch.zeros(1, CONFIG.text_dim))


def _x(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_student_blocks_are_spread_evenly_through_the_teachers_depth():
    assert student_blocks(4, 4) == [0, 1, 2, 3]
    assert student_blocks(4, 2) == [0, 3]
    assert student_blocks(8, 3) == [0, 4, 7]
    assert student_blocks(6, 1) == [5]
    with pytest.raises(ValueError, match="student_depth"):
        student_blocks(4, 5)


def test_full_depth_student_starts_as_the_teachers_conditional_prediction_at_any_guidance():
    teacher = _teacher(0)
    config, weights = student_from_teacher(CONFIG, teacher.state_dict())
    assert config.guidance_embed and config.depth == CONFIG.depth
    student = build(config)
    student.load_state_dict(weights, strict=True)
    text, x, t = _text(3), _x(3), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        expected = teacher(x, t, text.tokens, text.mask, text.pooled)
        for w in (1.0, 4.0, 8.0):
            got = student(x, t, text.tokens, text.mask, text.pooled, guidance=torch.full((3,), w))
            torch.testing.assert_close(got, expected)


def test_shallower_student_copies_evenly_spaced_teacher_blocks_and_everything_else():
    teacher = _teacher(0)
    teacher_weights = teacher.state_dict()
    config, weights = student_from_teacher(CONFIG, teacher_weights, student_depth=2)
    assert config.depth == 2
    student = build(config)
    student.load_state_dict(weights, strict=True)
    for student_index, teacher_index in enumerate([0, 3]):
        for name, value in student.blocks[student_index].state_dict().items():
            torch.testing.assert_close(value, teacher_weights[f"blocks.{teacher_index}.{name}"])
    shared = [n for n in weights if not n.startswith(("blocks.", "guidance_embedder."))]
    assert shared and all(torch.equal(weights[n], teacher_weights[n]) for n in shared)


def test_nested_grids_halve_the_steps_and_each_is_every_other_point_of_the_finer_one():
    grids = nested_grids(32, 4)
    assert sorted(grids) == [4, 8, 16, 32]
    for steps, grid in grids.items():
        assert grid.shape == (steps + 1,) and grid[0] == 0 and grid[-1] == 1
        assert bool((grid[1:] > grid[:-1]).all())
        if steps < 32:
            torch.testing.assert_close(grid, grids[2 * steps][::2])
    lq = nested_grids(8, 2, schedule="linear_quadratic")
    torch.testing.assert_close(lq[2], lq[8][::4])
    with pytest.raises(ValueError, match="power of 2"):
        nested_grids(24, 4)


def test_student_grid_is_the_grid_a_distilled_model_samples_on(tmp_path):
    from models.generate import TextToImage
    from tests.conftest import write_model_dir

    generator = TextToImage.from_dir(write_model_dir(tmp_path / "student", guidance_embed=True))
    for steps in (2, 4):
        torch.testing.assert_close(generator.sampling_times(steps), nested_grids(8, 2)[steps])


def test_ensemble_target_is_the_weighted_sum_of_each_teachers_guided_velocity():
    teachers = [_teacher(0), _teacher(1)]
    ensemble = TeacherEnsemble(teachers, [1.0, 3.0], _null())
    text, x, t = _text(4), _x(4), torch.tensor([0.0, 0.3, 0.6, 0.9])
    w = torch.tensor([1.0, 2.0, 4.0, 7.5])
    null = _null()
    expected = torch.zeros_like(x)
    with torch.no_grad():
        for teacher, alpha in zip(teachers, (0.25, 0.75)):
            v_c = teacher(x, t, text.tokens, text.mask, text.pooled)
            v_u = teacher(x, t, null.tokens.expand(4, -1, -1), null.mask.expand(4, -1), null.pooled.expand(4, -1))
            expected += alpha * (v_u + w.view(-1, 1, 1, 1, 1) * (v_c - v_u))
    torch.testing.assert_close(ensemble(x, t, text.tokens, text.mask, text.pooled, w), expected, rtol=1e-4, atol=1e-5)
    # one teacher at w = 1: its plain conditional velocity
    single = TeacherEnsemble([teachers[0]], [2.0], null)
    with torch.no_grad():
        torch.testing.assert_close(single(x, t, text.tokens, text.mask, text.pooled, torch.ones(4)),
                                   teachers[0](x, t, text.tokens, text.mask, text.pooled), rtol=1e-4, atol=1e-5)


def test_round_target_takes_x_where_two_euler_steps_of_the_previous_student_end():
    """Checked against the real sampler: two steps 0 -> t_b -> t_c from the same noise."""
    config, weights = student_from_teacher(CONFIG, _teacher(0).state_dict())
    previous = build(config)
    previous.load_state_dict(weights)
    with torch.no_grad():  # a non-zero guidance embedder, so w matters
        for parameter in previous.guidance_embedder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    previous.eval()
    text = _text(2)
    times = torch.tensor([0.0, 0.25, 0.5])
    x_c = sample(previous, text.tokens, text.mask, text.pooled, None, None, None, steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(5), shape=(2, 3, 1, 8, 8), times=times, guidance_input=True)
    x_a = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    full = lambda value: torch.full((2,), value)  # noqa: E731
    target = two_step_target(previous, x_a, full(0.0), full(0.25), full(0.5), text.tokens, text.mask, text.pooled,
                             full(3.0))
    torch.testing.assert_close(x_a + 0.5 * target, x_c, rtol=1e-4, atol=1e-5)


class _Steps(torch.utils.data.Dataset):
    """Two fixed 'latents' with two captions, batched per step by a StepPlan."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(2, 3, 1, 8, 8, generator=g).clamp(-1, 1).repeat(4, 1, 1, 1, 1)
        text = _text(2)
        self.text = TextEmbeddings(text.tokens.repeat(4, 1, 1), text.mask.repeat(4, 1), text.pooled.repeat(4, 1))
        self.plan = StepPlan([GroupSpec("image", 8)], {"image": 8}, 0)

    def batch(self, index) -> dict:
        index = torch.as_tensor(index)
        return {"groups": [{"x": self.x[index], "text_tokens": self.text.tokens[index],
                            "text_mask": self.text.mask[index], "text_pooled": self.text.pooled[index],
                            "media": "image"}]}

    def __getitem__(self, step: int) -> dict:
        ((_, indices),) = self.plan.step(step)
        return self.batch(indices)


def _fit(module: DistillModule, steps: int) -> None:
    lightning.seed_everything(0, verbose=False)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=steps, enable_checkpointing=False, logger=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Steps(), sampler=StepSampler(0), batch_size=None))


def _held_out_loss(module: DistillModule, model) -> float:
    batch = _Steps().batch(list(range(8)))
    module.teacher.to("cpu")
    with torch.no_grad():
        return float(module.distill_loss(model, batch["groups"][0], torch.Generator().manual_seed(11)))


def test_guidance_distillation_and_a_progressive_round_reduce_the_students_loss_on_a_toy_set():
    teachers = [_teacher(0), _teacher(1)]
    config, weights = student_from_teacher(CONFIG, teachers[0].state_dict(), student_depth=2)
    grids = nested_grids(8, 4)
    optim = OptimConfig(lr=3e-3, warmup_steps=2, ema_decay=0.9)
    module = DistillModule(config, weights, TeacherEnsemble(teachers, [1.0, 1.0], _null()), "guidance", grids[8],
                           optim, _null(), (1.0, 6.0))
    before = _held_out_loss(module, module.model)
    _fit(module, 40)
    after = _held_out_loss(module, module.ema)
    assert after < 0.5 * before, (before, after)

    # The round's student starts away from the target (from the other teacher), so there is something to learn.
    previous = frozen_copy(module.ema)
    _, other = student_from_teacher(CONFIG, teachers[1].state_dict(), student_depth=2)
    round_module = DistillModule(config, other, previous, "progressive", grids[4], optim, _null(),
                                 (1.0, 6.0), fine_grid=grids[8])
    # The frozen teacher is neither trained nor checkpointed: the state holds the student and its EMA only.
    assert {k.split(".")[0] for k in round_module.state_dict()} == {"model", "ema", "ema_updates", "null_tokens",
                                                                    "null_mask", "null_pooled"}
    start = _held_out_loss(round_module, round_module.model)
    _fit(round_module, 30)
    end = _held_out_loss(round_module, round_module.ema)
    assert end < 0.5 * start, (start, end)


def test_progressive_round_refuses_grids_that_are_not_nested():
    config, weights = student_from_teacher(CONFIG, _teacher(0).state_dict())
    grid = torch.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="nested"):
        DistillModule(config, weights, _teacher(0), "progressive", grid, OptimConfig(), _null(), (1.0, 2.0),
                      fine_grid=torch.tensor([0.0, 0.1, 0.4, 0.8, 1.0]))
