"""Flow matching: interpolation, timestep sampling, schedules, loss and the CFG sampler."""

import pytest
import torch

from models.dit import PRESETS, build
from models.flow import (
    FlowMatchingConfig,
    flow_matching_loss,
    interpolate,
    linear_quadratic_schedule,
    sample,
    sample_timesteps,
    uniform_schedule,
)

SHAPE = (2, 3, 8, 8)


pytestmark = pytest.mark.usefixtures("single_thread")


def _text(batch: int = 2, length: int = 4, dim: int = 6, value: float = 1.0):
    tokens = torch.full((batch, length, dim), value)
    mask = torch.ones(batch, length, dtype=torch.bool)
    pooled = torch.full((batch, dim), value)
    return tokens, mask, pooled


def test_interpolation_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    noise, data = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigma_min = 1e-2
    x0, v = interpolate(noise, data, torch.zeros(2), sigma_min)
    x1, _ = interpolate(noise, data, torch.ones(2), sigma_min)
    torch.testing.assert_close(x0, noise)
    torch.testing.assert_close(x1, data + sigma_min * noise)
    torch.testing.assert_close(v, data - (1 - sigma_min) * noise)
    # The target is the time derivative of the path.
    t, h = torch.full((2,), 0.3, dtype=torch.float64), 1e-6
    xa, _ = interpolate(noise.double(), data.double(), t, sigma_min)
    xb, _ = interpolate(noise.double(), data.double(), t + h, sigma_min)
    torch.testing.assert_close((xb - xa) / h, v.double(), atol=1e-5, rtol=1e-5)


def test_interpolation_uses_per_sample_t():
    noise, data = torch.zeros(SHAPE), torch.ones(SHAPE)
    x_t, _ = interpolate(noise, data, torch.tensor([0.25, 0.75]), 0.0)
    assert torch.all(x_t[0] == 0.25) and torch.all(x_t[1] == 0.75)


def test_logit_normal_timesteps_in_open_interval_and_reproducible():
    config = FlowMatchingConfig()
    t = sample_timesteps(20000, config, torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.02
    torch.testing.assert_close(t, sample_timesteps(20000, config, torch.Generator().manual_seed(0)))
    shifted = sample_timesteps(20000, FlowMatchingConfig(logit_normal_mean=1.0), torch.Generator().manual_seed(0))
    assert shifted.median() > 0.7


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
def test_linear_quadratic_schedule_is_monotone_from_0_to_1(num_steps):
    s = linear_quadratic_schedule(num_steps)
    assert s.shape == (num_steps + 1,)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert (s[1:] > s[:-1]).all()


def test_linear_quadratic_schedule_has_small_linear_start():
    s = linear_quadratic_schedule(50, linear_steps=25, linear_until=0.025)
    steps = s[1:] - s[:-1]
    torch.testing.assert_close(s[25], torch.tensor(0.025))
    torch.testing.assert_close(steps[:25], torch.full((25,), 0.001))
    assert (steps[25:] > steps[24] - 1e-7).all()  # quadratic part only gets coarser
    assert steps[-1] > 20 * steps[0]


def test_schedule_arguments_are_validated():
    with pytest.raises(ValueError, match="num_steps"):
        linear_quadratic_schedule(0)
    with pytest.raises(ValueError, match="linear_steps"):
        linear_quadratic_schedule(10, linear_steps=10)
    with pytest.raises(ValueError, match="linear_until"):
        linear_quadratic_schedule(10, linear_until=1.5)
    torch.testing.assert_close(uniform_schedule(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("schedule", ["linear_quadratic", "uniform"])
def test_euler_follows_analytic_velocity_field_to_the_target(schedule):
    """v(x, t) = (X1 - (1 - s) x) / (1 - (1 - s) t) is the exact field of the path to a fixed X1."""
    sigma_min = 1e-5
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)

    def model(x, t, tokens, mask, pooled):
        t = t.view(-1, 1, 1, 1)
        return (target.repeat(x.shape[0] // target.shape[0], 1, 1, 1) - (1 - sigma_min) * x) / (
            1 - (1 - sigma_min) * t
        )

    text = _text()
    out = sample(model, *text, *text, steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                 shape=SHAPE, solver="euler", schedule=schedule)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_solvers_reach_target_for_data_minus_noise_velocity(solver):
    target = torch.full(SHAPE, 0.5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))  # what sample draws first
    calls = []

    def model(x, t, tokens, mask, pooled):
        calls.append(x.shape[0])
        return target - noise

    text = _text()
    out = sample(model, *text, *text, steps=6, guidance_scale=1.0, generator=torch.Generator().manual_seed(7),
                 shape=SHAPE, solver=solver)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)
    assert len(calls) == (6 if solver == "euler" else 12)


def test_guidance_scale_one_equals_conditional_only():
    torch.manual_seed(0)
    model = build(PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move adaLN-zero layers off zero so text matters
    cfg = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    cond = (
        torch.randn(2, 8, cfg.text_dim, generator=g),
        torch.ones(2, 8, dtype=torch.bool),
        torch.randn(2, cfg.text_dim, generator=g),
    )
    null = (torch.zeros(1, 8, cfg.text_dim), torch.zeros(1, 8, dtype=torch.bool), torch.zeros(1, cfg.text_dim))

    def run(null_text, scale):
        generator = torch.Generator().manual_seed(3)
        shape = (2, 3, 16, 16)
        return sample(model, *cond, *null_text, steps=4, guidance_scale=scale, generator=generator, shape=shape)

    guided_one = run(null, 1.0)
    # Conditional-only reference: null caption equal to the condition, so guidance cannot matter.
    cond_only = run(cond, 3.0)
    torch.testing.assert_close(guided_one, cond_only, atol=1e-5, rtol=1e-5)
    guided = run(null, 3.0)
    assert not torch.allclose(guided, cond_only, atol=1e-3)


def test_guidance_extrapolates_cond_away_from_uncond_in_one_batched_call():
    batches = []

    def model(x, t, tokens, mask, pooled):
        batches.append(x.shape[0])
        return pooled[:, :1, None, None].expand_as(x)  # cond pooled = 1, null pooled = 0

    cond = _text(value=1.0)
    null = tuple(a[:1] for a in _text(value=0.0))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    out = sample(model, *cond, *null, steps=3, guidance_scale=4.0, generator=generator, shape=SHAPE)
    torch.testing.assert_close(out - x0, torch.full(SHAPE, 4.0))
    assert batches == [4, 4, 4]


def test_sampler_with_bf16_autocast_on_cpu():
    model = build(PRESETS["tiny"])
    cfg = PRESETS["tiny"]
    text = (torch.randn(1, 8, cfg.text_dim), torch.ones(1, 8, dtype=torch.bool), torch.randn(1, cfg.text_dim))
    out = sample(model, *text, *text, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                 shape=(1, 3, 16, 16), solver="heun", autocast_dtype=torch.bfloat16)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sampler_rejects_unknown_solver_and_schedule():
    text = _text()
    kwargs = dict(steps=2, guidance_scale=1.0, generator=None, shape=SHAPE)
    with pytest.raises(ValueError, match="solver"):
        sample(lambda *a: a[0], *text, *text, solver="rk4", **kwargs)
    with pytest.raises(ValueError, match="schedule"):
        sample(lambda *a: a[0], *text, *text, schedule="cosine", **kwargs)


def test_flow_matching_loss_is_deterministic_with_generator_and_zero_model_matches_target_energy():
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    text = _text(batch=64)
    config = FlowMatchingConfig()

    def zero_model(x, t, tokens, mask, pooled):
        return torch.zeros_like(x)

    a = flow_matching_loss(zero_model, data, *text, config, generator=torch.Generator().manual_seed(1))
    b = flow_matching_loss(zero_model, data, *text, config, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item()
    # E|X1 - X0|^2 = E|X1|^2 + 1 for X0 ~ N(0, I) independent of the data.
    expected = data.square().mean().item() + 1.0
    assert abs(a.item() - expected) < 0.1


def test_per_sample_seeds_make_a_sample_independent_of_its_batch():
    """A request micro-batched with others gets the noise it would get alone (serving relies on it)."""
    from models.flow import initial_noise

    alone = initial_noise((1, 3, 4, 4), [torch.Generator().manual_seed(7)], "cpu")
    batched = initial_noise((3, 3, 4, 4), [torch.Generator().manual_seed(s) for s in (1, 7, 2)], "cpu")
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        initial_noise((3, 3, 4, 4), [torch.Generator(), torch.Generator()], "cpu")


def test_guidance_input_model_runs_one_pass_per_step_and_cfg_two():
    """A guidance-distilled student costs one forward per step; a CFG teacher two (batched); a negative prompt
    makes the student run CFG at input scale 1."""
    calls = []

    def model(x, t, tokens, mask, pooled, guidance=None):
        calls.append((x.shape[0], None if guidance is None else float(guidance[0])))
        return torch.zeros_like(x)

    text = (torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4))
    null = (torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 4))
    times = torch.tensor([0.0, 0.5, 1.0])
    common = dict(steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), shape=(2, 3, 4, 4), times=times)
    sample(model, *text, None, None, None, guidance_input=True, **common)
    assert calls == [(2, 4.0), (2, 4.0)]
    calls.clear()
    sample(model, *text, *null, **common)
    assert calls == [(4, None), (4, None)]
    calls.clear()
    sample(model, *text, *null, guidance_input=True, **common)
    assert calls == [(4, 1.0), (4, 1.0)]
    with pytest.raises(ValueError, match="steps \\+ 1 = 2 points"):
        sample(model, *text, *null, **{**common, "steps": 1})
