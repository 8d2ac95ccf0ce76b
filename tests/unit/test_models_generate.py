"""TextToImage: per-request seeds, negative prompts, and how a distilled student is sampled."""

from __future__ import annotations


import pytest
import torch

from models.generate import TextToImage
from tests.conftest import write_model_dir


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextToImage, TextToImage]:
    root = tmp_path_factory.mktemp("models")
    return (TextToImage.from_dir(write_model_dir(root / "teacher")),
            TextToImage.from_dir(write_model_dir(root / "student", guidance_embed=True)))


def test_a_prompt_with_its_own_seed_gives_the_same_image_alone_or_batched(teacher_and_student):
    for generator in teacher_and_student:
        batched = generator.generate_tensor(["a red apple", "a cat", "a dog"], seed=[11, 12, 13])
        alone = generator.generate_tensor(["a cat"], seed=[12])
        assert torch.allclose(batched[1], alone[0], atol=1e-5)
        assert not torch.allclose(batched[0], batched[2], atol=1e-3)
        with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
            generator.generate_tensor(["a", "b", "c"], seed=[1, 2])


def test_negative_prompt_changes_the_image_and_empty_means_none(teacher_and_student):
    for generator in teacher_and_student:
        plain = generator.generate_tensor(["a red apple"], seed=[3])
        assert torch.equal(generator.generate_tensor(["a red apple"], seed=[3], negative_prompts=[""]), plain)
        negative = generator.generate_tensor(["a red apple"], seed=[3], negative_prompts=["blurry, dark"])
        assert (negative - plain).abs().max() > 1e-3


def test_student_defaults_to_its_few_steps_on_a_uniform_grid(teacher_and_student):
    teacher, student = teacher_and_student
    assert student.distilled and not teacher.distilled
    assert student.default_steps == 2 and teacher.default_steps == 4
    assert torch.allclose(student.sampling_times(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert teacher.sampling_times(4)[1] < 0.05  # Movie Gen's linear-quadratic start
    calls = []
    hook = student.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        student.generate_tensor(["a", "b"], seed=0)
    finally:
        hook.remove()
    assert calls == [2, 2]  # default 2 steps, one pass of the batch per step (no unconditional half)
