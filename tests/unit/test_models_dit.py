"""Behaviour of the DiT generator: image and video shapes, 3D RoPE, adaLN-zero init, presets, text
masking, old checkpoints and config validation."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from models.dit import PRESETS, DiT, DiTConfig, apply_rope, build, parameter_count, rope_angles, rope_split

TINY = PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(config: DiTConfig, batch: int = 3, seed: int = 0, frames: int | None = 1, height=None, width=None):
    """Model inputs; frames=None gives the 4D image layout [B, C, H, W]."""
    g = torch.Generator().manual_seed(seed)
    H = height or config.image_size
    W = width or config.image_size
    shape = (batch, config.in_channels, H, W) if frames is None else (batch, config.in_channels, frames, H, W)
    x = torch.randn(*shape, generator=g)
    t = torch.rand(batch, generator=g)
    tokens = torch.randn(batch, config.max_text_tokens, config.text_dim, generator=g)
    mask = torch.zeros(batch, config.max_text_tokens, dtype=torch.bool)
    mask[:, :5] = True
    pooled = torch.randn(batch, config.text_dim, generator=g)
    return x, t, tokens, mask, pooled


def _perturbed(config: DiTConfig, seed: int = 1) -> DiT:
    """A model whose zero-initialised layers have been moved off zero, as after some training."""
    torch.manual_seed(seed)
    model = build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_one_model_runs_images_videos_and_aspect_buckets():
    model = _perturbed(TINY)
    _, t, tokens, mask, pooled = _inputs(TINY)
    # Image (T=1), video (T=3), landscape and portrait buckets, a larger resolution stage: same weights.
    for shape in [(1, 16, 16), (3, 16, 16), (1, 8, 24), (2, 24, 8), (1, 32, 32)]:
        x = torch.randn(3, TINY.in_channels, *shape)
        v = model(x, t, tokens, mask, pooled)
        assert v.shape == x.shape
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
        assert v.abs().max() > 0


def test_4d_image_input_is_a_one_frame_video_and_comes_back_4d():
    model = _perturbed(TINY).eval()
    x, t, tokens, mask, pooled = _inputs(TINY, frames=None)
    v_image = model(x, t, tokens, mask, pooled)
    assert v_image.shape == x.shape  # [B, C, H, W]
    v_video = model(x.unsqueeze(2), t, tokens, mask, pooled)
    assert v_video.shape == (3, TINY.in_channels, 1, 16, 16)
    torch.testing.assert_close(v_video[:, :, 0], v_image, rtol=0, atol=0)


def test_temporal_patches_and_first_frame_of_a_video_model():
    config = dataclasses.replace(TINY, patch_size_t=2, frames=2)
    model = _perturbed(config).eval()
    x, t, tokens, mask, pooled = _inputs(config, frames=4)
    v = model(x, t, tokens, mask, pooled)
    assert v.shape == x.shape
    # The frames of a clip are generated jointly: frame 0's velocity depends on frame 3.
    later_changed = x.clone()
    later_changed[:, :, 3] += 1.0
    assert not torch.allclose(model(later_changed, t, tokens, mask, pooled)[:, :, 0], v[:, :, 0])
    # An image through a video model (pt=1): its tokens sit at t=0, encoded as the first frame of a clip.
    video_model = _perturbed(dataclasses.replace(TINY, frames=4)).eval()
    image, *_ = _inputs(TINY, frames=1)
    v_image = video_model(image, t, tokens, mask, pooled)
    assert v_image.shape == image.shape and torch.isfinite(v_image).all()
    one_frame = rope_angles(1, 4, 4, TINY.head_dim, TINY.rope_theta)
    first_frame_of_clip = rope_angles(4, 4, 4, TINY.head_dim, TINY.rope_theta)[:16]
    torch.testing.assert_close(one_frame, first_frame_of_clip, rtol=0, atol=0)


@pytest.mark.parametrize("frames", [1, 3])
def test_adaln_zero_init_predicts_exactly_zero(frames):
    model = build(TINY)
    v = model(*_inputs(TINY, frames=frames))
    assert torch.equal(v, torch.zeros_like(v))


def test_meta_build_then_materialise_gives_the_zero_model():
    model = build(TINY, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.initialize_weights()
    v = model(*_inputs(TINY, frames=2))
    assert torch.equal(v, torch.zeros_like(v))


def test_output_depends_on_text_but_not_on_padded_tokens():
    model = _perturbed(TINY).eval()
    x, t, tokens, mask, pooled = _inputs(TINY, frames=2)
    base = model(x, t, tokens, mask, pooled)

    padded_changed = tokens.clone()
    padded_changed[:, 5:] += 100.0  # only positions where mask is False
    torch.testing.assert_close(model(x, t, padded_changed, mask, pooled), base)

    real_changed = tokens.clone()
    real_changed[:, :5] += 1.0
    assert not torch.allclose(model(x, t, real_changed, mask, pooled), base)


def test_caption_with_no_real_tokens_gives_finite_output():
    model = _perturbed(TINY)
    x, t, tokens, mask, pooled = _inputs(TINY, frames=2)
    mask[1] = False
    v = model(x, t, tokens, mask, pooled)
    assert torch.isfinite(v).all()


def test_bf16_autocast_forward_is_finite_and_close_to_fp32():
    model = _perturbed(TINY)
    inputs = _inputs(TINY, frames=2)
    reference = model(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(*inputs)
        cos, sin = model.rope(2, 4, 4, device=torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32  # RoPE angles never in bf16
    assert torch.isfinite(v.float()).all()
    assert (v.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_grad_checkpointing_gives_the_same_gradients():
    plain = _perturbed(TINY, seed=3)
    ckpt = _perturbed(dataclasses.replace(TINY, grad_checkpointing=True), seed=3)
    inputs = _inputs(TINY, frames=2)
    for model in (plain, ckpt):
        model.train()
        model(*inputs).square().mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = TINY.head_dim
    angles = rope_angles(5, 6, 7, d, TINY.rope_theta)  # [5*6*7, d/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    q, k = torch.randn(2, d, dtype=torch.float32)

    def score(a: tuple[int, int, int], b: tuple[int, int, int]) -> torch.Tensor:
        i, j = (pos[0] * 42 + pos[1] * 7 + pos[2] for pos in (a, b))
        qi = apply_rope(q[None], cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k[None], cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    a, b, shift = (0, 1, 2), (1, 3, 0), (2, 2, 3)
    moved = tuple(tuple(p + s for p, s in zip(pos, shift)) for pos in (a, b))
    torch.testing.assert_close(score(*moved), score(a, b), rtol=1e-5, atol=1e-5)
    # ...but a different offset gives a different score, along every axis.
    for axis in range(3):
        b_other = tuple(p + (axis == i) for i, p in enumerate(b))
        assert not torch.isclose(score(a, b_other), score(a, b), rtol=1e-3)


def test_rope_gives_every_token_its_own_encoding_and_ignores_grid_size():
    d = TINY.head_dim
    assert sum(rope_split(d)) == d and all(part % 2 == 0 for part in rope_split(d))
    assert rope_split(128) == (44, 42, 42)  # moviegen-30b heads
    angles = rope_angles(3, 4, 5, d, TINY.rope_theta)
    assert torch.unique(angles, dim=0).shape[0] == 3 * 4 * 5
    # Plain patch indices: a 4x4 grid's encodings are the top-left corner of an 8x8 grid's.
    small = rope_angles(1, 4, 4, d, TINY.rope_theta).view(4, 4, -1)
    large = rope_angles(1, 8, 8, d, TINY.rope_theta).view(8, 8, -1)
    torch.testing.assert_close(small, large[:4, :4], rtol=0, atol=0)


def test_model_sees_where_content_is():
    """Self-attention alone is permutation-equivariant; with RoPE, swapping two patches is not a swap of outputs."""
    model = _perturbed(TINY).eval()
    x, t, tokens, mask, pooled = _inputs(TINY, frames=1)
    v = model(x, t, tokens, mask, pooled)
    swapped = x.clone()
    swapped[..., 0:4, 0:4], swapped[..., 8:12, 4:8] = x[..., 8:12, 4:8], x[..., 0:4, 0:4]
    v_swapped = model(swapped, t, tokens, mask, pooled)
    unswapped = v_swapped.clone()
    unswapped[..., 0:4, 0:4], unswapped[..., 8:12, 4:8] = v_swapped[..., 8:12, 4:8], v_swapped[..., 0:4, 0:4]
    assert (unswapped - v).abs().max() > 1e-3


def test_rope_cache_made_in_inference_mode_does_not_break_training():
    model = _perturbed(TINY)
    inputs = _inputs(TINY, frames=2)
    with torch.inference_mode():
        model(*inputs)
    model.train()
    model(*inputs).square().mean().backward()  # would raise if an inference tensor were saved for backward
    assert model.patch_embed.weight.grad is not None
    grid = (2, 4, 4)
    assert model.rope(*grid, device=torch.device("cpu"))[0] is model.rope(*grid, device=torch.device("cpu"))[0]


def test_checkpoint_of_the_image_only_dit_loads():
    """The image DiT stored its patch embedding as a Conv2d [D, C, p, p]; those weights still load."""
    source = _perturbed(TINY)
    weights = source.state_dict()
    D, p, C = TINY.width, TINY.patch_size, TINY.in_channels
    weights["patch_embed.weight"] = weights["patch_embed.weight"].view(D, C, p, p)
    fresh = build(TINY)
    fresh.load_state_dict(weights, strict=True)
    inputs = _inputs(TINY, frames=None)
    torch.testing.assert_close(fresh(*inputs), source(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 4, 1, 16, 16), "expected x with 3 channels"),
        ((2, 4, 16, 16), "expected x with 3 channels"),
        ((2, 3, 1, 16, 14), r"divisible by the patch \(1, 4, 4\).*\(1, 16, 14\)"),
        ((2, 3, 18, 16), r"divisible by the patch"),
        ((2, 3, 16), r"expected x of shape \[B, C, T, H, W\]"),
    ],
)
def test_wrong_input_shapes_are_rejected_with_expected_and_got(shape, message):
    model = build(TINY)
    _, t, tokens, mask, pooled = _inputs(TINY, batch=2)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape), t, tokens, mask, pooled)


def test_odd_frame_count_is_rejected_when_patches_span_two_frames():
    config = dataclasses.replace(TINY, patch_size_t=2, frames=2)
    model = build(config)
    x, t, tokens, mask, pooled = _inputs(config, frames=3)
    with pytest.raises(ValueError, match=r"divisible by the patch \(2, 4, 4\)"):
        model(x, t, tokens, mask, pooled)


def test_small_presets_build_and_run():
    demo = build(PRESETS["demo"])
    n_demo = parameter_count(demo)
    print(f"demo preset: {n_demo:,} parameters")
    assert abs(n_demo - 4_136_688) < 0.05 * 4_136_688  # the image-only demo DiT's size
    v = demo(*_inputs(PRESETS["demo"], batch=1, frames=None))
    assert v.shape == (1, 3, 32, 32)

    latent = PRESETS["demo-latent"]
    assert (latent.in_channels, latent.patch_size, latent.patch_size_t, latent.image_size) == (8, 1, 1, 8)
    demo_latent = build(latent)
    print(f"demo-latent preset: {parameter_count(demo_latent):,} parameters")
    v = _perturbed(latent)(*_inputs(latent, batch=2, frames=3))
    assert v.shape == (2, 8, 3, 8, 8) and torch.isfinite(v).all()

    dit_s = build(PRESETS["dit-s"], device="meta")
    assert 25e6 < parameter_count(dit_s) < 40e6
    assert parameter_count(build(TINY)) < 1e6


def test_moviegen_30b_instantiates_on_meta_device():
    config = PRESETS["moviegen-30b"]
    assert (config.depth, config.width, config.heads, config.mlp_hidden) == (48, 6144, 48, 16384)
    assert (config.in_channels, config.patch_size_t, config.patch_size) == (16, 1, 2)
    model = build(config, device="meta")
    n = parameter_count(model)
    print(f"moviegen-30b preset: {n:,} parameters ({n / 1e9:.2f}B)")
    assert 27e9 < n < 33e9
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"width": 64, "heads": 3}, "width"),
        ({"width": 60, "heads": 4}, "head_dim"),  # 15: odd, RoPE pairs channels
        ({"width": 64, "heads": 16}, "head_dim"),  # 4: too small for three even parts
        ({"image_size": 30, "patch_size": 4}, "image_size"),
        ({"frames": 3, "patch_size_t": 2}, "frames"),
        ({"patch_size_t": 0}, "patch_size_t"),
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"depth": 0}, "depth"),
        ({"heads": -2}, "heads"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"text_dim": True}, "text_dim"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"max_text_tokens": 0}, "max_text_tokens"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DiTConfig(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    for config in PRESETS.values():
        assert DiTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="learn_sigma"):
        DiTConfig.from_dict({**PRESETS["demo"].to_dict(), "learn_sigma": True})
    # A config saved before video support (no frames/patch_size_t/rope_theta) still loads.
    old = {k: v for k, v in PRESETS["demo"].to_dict().items() if k not in ("frames", "patch_size_t", "rope_theta")}
    assert DiTConfig.from_dict(old) == PRESETS["demo"]
    assert PRESETS["moviegen-30b"].sample_shape(2) == (2, 16, 32, 96, 96)


def test_models_package_never_imports_orchestration_layers():
    """models/ is the bottom layer: it must not pull in pipeline, tracking or storage clients."""
    forbidden = {"kfp", "mlflow", "dvc", "boto3", "botocore", "components", "pipelines"}
    root = Path(__file__).resolve().parents[2] / "models"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders, offenders


def test_guidance_embedding_starts_at_zero_and_is_required():
    """A student built from a teacher's weights predicts what the teacher predicts until it learns the guidance input."""
    import dataclasses

    teacher_config = PRESETS["tiny"]
    teacher = build(teacher_config)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    student = build(dataclasses.replace(teacher_config, guidance_embed=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert all(k.startswith("guidance_embedder.") for k in missing) and not unexpected
    x = torch.randn(2, 3, 16, 16)
    t = torch.rand(2)
    text = (torch.randn(2, 32, 384), torch.ones(2, 32, dtype=torch.bool), torch.randn(2, 384))
    expected = teacher(x, t, *text)
    assert torch.allclose(student(x, t, *text, guidance=torch.tensor([1.0, 7.5])), expected, atol=1e-6)
    with pytest.raises(ValueError, match="pass guidance"):
        student(x, t, *text)
    with pytest.raises(ValueError, match="without guidance_embed"):
        teacher(x, t, *text, guidance=torch.tensor([2.0, 2.0]))
