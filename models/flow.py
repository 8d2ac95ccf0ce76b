"""Flow matching in the Movie Gen convention: t=0 is noise X0, t=1 is data X1.

    X_t = t * X1 + (1 - (1 - sigma_min) * t) * X0
    V   = d X_t / d t = X1 - (1 - sigma_min) * X0

Training regresses the model output on V at logit-normal t; sampling integrates dX/dt = v(X, t)
from t=0 to t=1 with Euler or Heun steps and classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

# model(x_t [B,C,H,W], t [B], text_tokens [B,L,D], text_mask [B,L], text_pooled [B,D]) -> velocity [B,C,H,W]
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Training-time flow-matching hyper-parameters."""

    sigma_min: float = 1e-5  # noise std left at t=1; keeps the path invertible at the data end
    logit_normal_mean: float = 0.0  # mean of the normal whose sigmoid gives t
    logit_normal_std: float = 1.0  # its std; 1.0 concentrates training on mid-range t (SD3 / Movie Gen)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min!r}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be positive, got {self.logit_normal_std!r}")


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None
) -> torch.Tensor:
    """Standard normal float32 noise; drawn on the generator's device so a seed means the same numbers everywhere."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device).to(device)


def sample_timesteps(
    batch_size: int,
    config: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logit-normal training times t = sigmoid(N(mean, std)), shape [batch_size], in (0, 1)."""
    u = _randn((batch_size,), generator, device) * config.logit_normal_std + config.logit_normal_mean
    return torch.sigmoid(u)


def interpolate(
    noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor, sigma_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point on the noise->data path and its velocity: (X_t, V), both shaped like data; t is [B]."""
    t = t.to(data.dtype).view(-1, *([1] * (data.ndim - 1)))  # [B, 1, 1, 1]
    x_t = t * data + (1 - (1 - sigma_min) * t) * noise
    velocity = data - (1 - sigma_min) * noise
    return x_t, velocity


def flow_matching_loss(
    model: VelocityModel,
    data: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    config: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean-squared error between model velocity and the target velocity, as a float32 scalar.

    t defaults to logit-normal samples; pass a fixed t (and generator) for a deterministic loss.
    """
    if t is None:
        t = sample_timesteps(data.shape[0], config, generator, data.device)
    noise = _randn(data.shape, generator, data.device).to(data.dtype)
    x_t, target = interpolate(noise, data, t, config.sigma_min)
    prediction = model(x_t, t.to(data.device), text_tokens, text_mask, text_pooled)
    # Loss in float32: under bf16 autocast the MSE of small residuals would otherwise round to steps.
    return F.mse_loss(prediction.float(), target.float())


def linear_quadratic_schedule(
    num_steps: int, linear_steps: int | None = None, linear_until: float = 0.025
) -> torch.Tensor:
    """Movie Gen sampling times [num_steps + 1], increasing from exactly 0 to exactly 1.

    The first ``linear_steps`` steps (default half) advance t linearly up to ``linear_until``;
    the rest follow a quadratic that is continuous in value and slope at the join. Small
    steps near the noise end are where the trajectory bends most, so that is where they go.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not 0.0 < linear_until < 1.0:
        raise ValueError(f"linear_until must be in (0, 1), got {linear_until!r}")
    if num_steps == 1:
        return torch.tensor([0.0, 1.0])
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 1 <= linear_steps < num_steps:
        raise ValueError(f"linear_steps must be in [1, {num_steps - 1}], got {linear_steps!r}")
    quadratic_steps = num_steps - linear_steps
    slope = linear_until / linear_steps
    curvature = (1.0 - linear_until - slope * quadratic_steps) / quadratic_steps**2
    values = []
    for i in range(num_steps + 1):
        if i <= linear_steps:
            values.append(i * slope)
        else:
            k = i - linear_steps
            values.append(linear_until + slope * k + curvature * k * k)
    values[-1] = 1.0  # exact endpoint despite float rounding
    schedule = torch.tensor(values, dtype=torch.float64)
    if not bool((schedule[1:] > schedule[:-1]).all()):
        raise ValueError(
            f"linear_until={linear_until} with {linear_steps}/{num_steps} linear steps gives a non-monotone schedule"
        )
    return schedule.float()


def uniform_schedule(num_steps: int) -> torch.Tensor:
    """Evenly spaced sampling times [num_steps + 1] from 0 to 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return torch.linspace(0.0, 1.0, num_steps + 1)


def initial_noise(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
                  device: torch.device | str | None) -> torch.Tensor:
    """X0 ~ N(0, I) float32: one generator for the batch, or one per sample (shape[0] of them).

    Per-sample generators make each sample's noise depend on its own seed only, so a request
    micro-batched with others gets the same image as alone.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return _randn(shape, generator, device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.cat([_randn((1, *shape[1:]), g, device) for g in generators])


@torch.no_grad()
def sample(
    model: VelocityModel,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text_pooled: torch.Tensor,
    null_tokens: torch.Tensor | None,
    null_mask: torch.Tensor | None,
    null_pooled: torch.Tensor | None,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    shape: Sequence[int],
    solver: Literal["euler", "heun"] = "euler",
    schedule: Literal["linear_quadratic", "uniform"] = "linear_quadratic",
    autocast_dtype: torch.dtype | None = None,
    times: torch.Tensor | None = None,
    guidance_input: bool = False,
) -> torch.Tensor:
    """Integrate the velocity field from noise (t=0) to data (t=1) with classifier-free guidance.

    text_* are [B,L,D]/[B,L]/[B,D]; null_* (the empty caption, or per-sample negative prompts)
    may have batch 1 and are broadcast. ``shape`` is the full [B,C,...]. ``times`` [steps+1]
    replaces ``schedule`` (a distilled student's nested grid). ``generator`` is one generator or
    one per sample (see :func:`initial_noise`).

    Guidance: a CFG model gets v_u + s * (v_c - v_u) from one batched forward of cond + uncond
    (s == 1 skips the unconditional half). A guidance-distilled model (``guidance_input``) takes
    s as an input and needs one forward per step; the caller marks it with ``guidance_input``
    and passes ``null_*`` as None, or passes negative prompts in ``null_*``, which runs CFG on
    top of the student at input scale 1. The model's train/eval mode is left to the caller.
    Returns float32 x at t=1 (unclamped, data space).
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if times is not None:
        times = times.float()
        if times.ndim != 1 or len(times) != steps + 1:
            raise ValueError(f"times must have steps + 1 = {steps + 1} points, got shape {list(times.shape)}")
    elif schedule == "linear_quadratic":
        times = linear_quadratic_schedule(steps)
    elif schedule == "uniform":
        times = uniform_schedule(steps)
    else:
        raise ValueError(f"schedule must be 'linear_quadratic' or 'uniform', got {schedule!r}")
    shape = tuple(shape)
    batch = shape[0]
    if text_tokens.shape[0] != batch:
        raise ValueError(f"text batch {text_tokens.shape[0]} does not match shape batch {batch}")
    device = text_tokens.device
    # CFG (two passes) whenever an unconditional / negative branch is given; a guidance-input student
    # with a negative prompt then runs at input scale 1 (its own guidance is toward the empty caption).
    two_pass = null_tokens is not None and not math.isclose(guidance_scale, 1.0)
    model_scale = 1.0 if two_pass else guidance_scale

    if two_pass:
        tokens = torch.cat([text_tokens, null_tokens.to(text_tokens).expand(batch, -1, -1)])  # [2B, L, D]
        mask = torch.cat([text_mask.bool(), null_mask.to(device).bool().expand(batch, -1)])  # [2B, L]
        pooled = torch.cat([text_pooled, null_pooled.to(text_pooled).expand(batch, -1)])  # [2B, D]
    else:
        tokens, mask, pooled = text_tokens, text_mask.bool(), text_pooled

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        x_in = torch.cat([x, x]) if two_pass else x  # [2B or B, C, ...]
        t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.float32)
        extra = {"guidance": torch.full_like(t_in, model_scale)} if guidance_input else {}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            v = model(x_in, t_in, tokens, mask, pooled, **extra)
        v = v.float()
        if not two_pass:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    x = initial_noise(shape, generator, device)  # X0 ~ N(0, I), [B, C, ...]
    for i in range(steps):
        t0, t1 = float(times[i]), float(times[i + 1])
        dt = t1 - t0
        v0 = velocity(x, t0)
        if solver == "euler":
            x = x + dt * v0
        else:
            x_pred = x + dt * v0
            x = x + dt * 0.5 * (v0 + velocity(x_pred, t1))
    return x
