"""Few-step student from an ensemble of teachers: guidance distillation, then progressive distillation.

The method is the two-stage recipe of Meng et al. 2023, "On Distillation of Guided Diffusion
Models" (CVPR 2023), as the animated-stickers paper (Yan et al. 2024) uses it for a few-step
student trained from an ensemble of teachers, adapted from diffusion to flow matching: the
networks predict the velocity of the optimal-transport path (t=0 noise, t=1 data, see
:mod:`models.flow`), and a "step" is one Euler step of dX/dt = v(X, t).

1. Guidance distillation. Classifier-free guidance costs two forward passes per step (with and
   without the caption). The student is a DiT with ``guidance_embed=True``: it takes the
   guidance scale w as an input and learns the guided velocity of the teacher ensemble in one
   pass::

       v_S(x_t, t, c, w)  ~=  sum_k alpha_k [ v_k(x_t, t, 0) + w (v_k(x_t, t, c) - v_k(x_t, t, 0)) ]

   with alpha_k the recipe's teacher weights normalised to sum 1, 0 the empty caption and
   w ~ U[guidance_min, guidance_max] per sample. x_t is a real training latent interpolated
   with fresh noise (:func:`models.flow.interpolate`) at t drawn from the points of the
   teacher grid, the times the student will be evaluated at.

2. Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling
   of Diffusion Models"). Rounds halve the sampling steps from ``teacher_steps`` to
   ``student_steps``. The grids are nested (:func:`nested_grids`): the grid of N steps is
   every other point of the grid of 2N steps, so a point t_a of G_N is followed in G_2N by
   t_b and then t_c, the next point of G_N. The frozen previous student (the guidance-distilled
   one in the first round) takes two Euler steps t_a -> t_b -> t_c from x_a, and the new
   student learns to take them in one: its target velocity is (x_c - x_a) / (t_c - t_a)
   (:func:`two_step_target`). Both see the same caption and the same w.

   x_a: we follow Salimans & Ho and start from data-conditioned points, a real latent
   interpolated with noise to t_a, rather than points on the previous student's own sampling
   trajectory. That needs no sampling during training (each step costs three forwards
   instead of up to 2N) and covers the region around the data manifold that the student
   visits; the price is a small mismatch with the trajectories the student will actually
   follow from pure noise, which the rounds' small step ratio (2:1) keeps small.

Losses are MSE in float32. Each phase keeps an EMA of the student (the EMA is what the next
round distils from and what ships), trains with AdamW and a linear warm-up, all inherited from
:class:`models.training.FlowMatchingModule`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from models.dit import DiT, DiTConfig, build
from models.flow import FlowMatchingConfig, interpolate, linear_quadratic_schedule, uniform_schedule
from models.training import FlowMatchingModule, OptimConfig, TextBatch

GridSchedule = Literal["uniform", "linear_quadratic"]


# ---------------------------------------------------------------------------------------------
# Student initialisation


def student_blocks(teacher_depth: int, student_depth: int) -> list[int]:
    """Teacher block indices a student of `student_depth` blocks starts from, evenly spaced, first and last kept.

    A shallower student keeps blocks spread through the depth (like DistilBERT's every-other
    layer) so it starts with the early, middle and late features of the teacher.
    """
    if not 1 <= student_depth <= teacher_depth:
        raise ValueError(f"student_depth must be in [1, {teacher_depth}] (the teacher's depth), got {student_depth}")
    if student_depth == 1:
        return [teacher_depth - 1]  # the last block writes the features the output layer reads
    return [round(i * (teacher_depth - 1) / (student_depth - 1)) for i in range(student_depth)]


def student_from_teacher(teacher_config: DiTConfig, teacher_weights: dict[str, torch.Tensor],
                         student_depth: int | None = None, seed: int = 0) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(student config, full student state dict) initialised from a teacher.

    The student is the teacher's architecture with ``guidance_embed=True`` and `student_depth`
    blocks (None = the teacher's depth). Every weight whose name and shape match is copied;
    block i of the student is teacher block :func:`student_blocks`[i]. The guidance embedder
    is new: its output layer is zero-initialised by the DiT, so the student starts exactly as
    the teacher's conditional (unguided, w = 1) prediction.
    """
    depth = teacher_config.depth if student_depth is None else int(student_depth)
    keep = student_blocks(teacher_config.depth, depth)
    config = replace(teacher_config, guidance_embed=True, depth=depth)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the new (guidance) weights are a function of the seed only
    try:
        student = build(config)
    finally:
        torch.random.set_rng_state(generator_state)
    state = student.state_dict()
    for name, tensor in state.items():
        source = name
        if name.startswith("blocks."):
            index, rest = name[len("blocks."):].split(".", 1)
            source = f"blocks.{keep[int(index)]}.{rest}"
        if source in teacher_weights:
            weight = teacher_weights[source]
            if tuple(weight.shape) != tuple(tensor.shape):
                raise ValueError(f"teacher weight {source} has shape {tuple(weight.shape)}, the student's "
                                 f"{name} {tuple(tensor.shape)}")
            state[name] = weight.detach().to(tensor.dtype).clone()
        elif not name.startswith("guidance_embedder."):
            raise ValueError(f"the teacher has no weight {source} for the student's {name}")
    return config, state


# ---------------------------------------------------------------------------------------------
# Grids


def nested_grids(teacher_steps: int, student_steps: int,
                 schedule: GridSchedule = "uniform") -> dict[int, torch.Tensor]:
    """{N: times [N+1]} for N = teacher_steps, teacher_steps/2, ..., student_steps; each grid is every
    other point of the one above it (G_N = G_T[:: T/N]), so a round's two-step targets land on grid points.

    `schedule` is the teacher grid G_T. ``uniform`` is what distilled students sample on (see
    :meth:`models.generate.TextToImage.sampling_times`): nested linear-quadratic grids would put
    half of a 4-step student's steps below t = 0.025.
    """
    ratio = teacher_steps // student_steps if student_steps > 0 else 0
    if student_steps < 1 or teacher_steps % student_steps or ratio & (ratio - 1):
        raise ValueError(f"teacher_steps {teacher_steps} must be student_steps {student_steps} times a power of 2")
    base = uniform_schedule(teacher_steps) if schedule == "uniform" else linear_quadratic_schedule(teacher_steps)
    grids = {}
    steps = teacher_steps
    while steps >= student_steps:
        grids[steps] = base[:: teacher_steps // steps].clone()
        steps //= 2
    return grids


# ---------------------------------------------------------------------------------------------
# Targets


class TeacherEnsemble:
    """Weighted classifier-free-guided velocity of several frozen teachers (same latent space and text encoder).

    Not an ``nn.Module`` on purpose: it is never trained or checkpointed with the student.
    """

    def __init__(self, teachers: Sequence[DiT], weights: Sequence[float], null_text: TextBatch) -> None:
        if not teachers or len(teachers) != len(weights):
            raise ValueError(f"{len(teachers)} teachers and {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"teacher weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.teachers = [t.eval().requires_grad_(False) for t in teachers]
        self.weights = [float(w) / total for w in weights]  # alpha_k, summing to 1
        self.null_tokens = null_text.tokens.detach().float().reshape(1, null_text.tokens.shape[-2], -1)
        self.null_mask = null_text.mask.detach().bool().reshape(1, -1)
        self.null_pooled = null_text.pooled.detach().float().reshape(1, -1)

    def to(self, device: torch.device | str) -> "TeacherEnsemble":
        """Move the teachers and the empty caption to `device`."""
        self.teachers = [t.to(device) for t in self.teachers]
        self.null_tokens, self.null_mask, self.null_pooled = (self.null_tokens.to(device), self.null_mask.to(device),
                                                              self.null_pooled.to(device))
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """sum_k alpha_k [v_k(x,t,empty) + w (v_k(x,t,c) - v_k(x,t,empty))], float32 shaped like x; guidance w is [B]."""
        batch = x.shape[0]
        both_tokens = torch.cat([tokens, self.null_tokens.to(tokens).expand(batch, -1, -1)])  # [2B, L, D]
        both_mask = torch.cat([mask.bool(), self.null_mask.expand(batch, -1)])  # [2B, L]
        both_pooled = torch.cat([pooled, self.null_pooled.to(pooled).expand(batch, -1)])  # [2B, D]
        w = guidance.float().view(-1, *([1] * (x.ndim - 1)))  # [B, 1, ...]
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for teacher, alpha in zip(self.teachers, self.weights):
            v_cond, v_uncond = teacher(torch.cat([x, x]), torch.cat([t, t]), both_tokens, both_mask,
                                       both_pooled).float().chunk(2)
            total = total + alpha * (v_uncond + w * (v_cond - v_uncond))
        return total


@torch.no_grad()
def two_step_target(model: Any, x_a: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, t_c: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                    guidance: torch.Tensor) -> torch.Tensor:
    """Velocity that takes x_a at t_a to where two Euler steps of `model` (t_a -> t_b -> t_c) end: (x_c - x_a) / (t_c - t_a).

    `model` is a guidance-input velocity model (the frozen previous student); t_* are [B].
    """
    shape = (-1, *([1] * (x_a.ndim - 1)))
    v_a = model(x_a, t_a, tokens, mask, pooled, guidance=guidance).float()
    x_b = x_a.float() + (t_b - t_a).view(shape) * v_a
    v_b = model(x_b.to(x_a.dtype), t_b, tokens, mask, pooled, guidance=guidance).float()
    x_c = x_b + (t_c - t_b).view(shape) * v_b
    return (x_c - x_a.float()) / (t_c - t_a).view(shape)


# ---------------------------------------------------------------------------------------------
# Lightning


class DistillModule(FlowMatchingModule):
    """One phase of distillation: guidance distillation from a :class:`TeacherEnsemble`, or one progressive
    round from a frozen previous student.

    ``self.model`` is the student (a guidance-embedding DiT) and ``self.ema`` its EMA; the optimiser
    (AdamW + warm-up), gradient clipping and the EMA update are :class:`FlowMatchingModule`'s.
    Batches are the training stages' ``{"groups": [...]}`` of real latents and caption embeddings.

    - ``phase="guidance"``: `teacher` is the ensemble; t is a point of `grid` (the teacher grid,
      excluding t = 1) and the target the ensemble's guided velocity.
    - ``phase="progressive"``: `teacher` is the frozen previous student; `grid` is G_N of this
      round and `fine_grid` G_2N; the target is :func:`two_step_target`.
    """

    def __init__(self, student_config: DiTConfig, init_weights: dict[str, torch.Tensor], teacher: Any,
                 phase: Literal["guidance", "progressive"], grid: torch.Tensor, optim: OptimConfig,
                 null_text: TextBatch, guidance_range: tuple[float, float], fine_grid: torch.Tensor | None = None,
                 val_seed: int = 0) -> None:
        if not student_config.guidance_embed:
            raise ValueError("the student must take guidance as an input: guidance_embed=True")
        if phase not in ("guidance", "progressive"):
            raise ValueError(f"phase must be 'guidance' or 'progressive', got {phase!r}")
        if phase == "progressive":
            if fine_grid is None or len(fine_grid) != 2 * (len(grid) - 1) + 1:
                raise ValueError("a progressive round needs fine_grid with twice the steps of grid")
            if not torch.allclose(fine_grid[::2], grid):
                raise ValueError("grid must be every other point of fine_grid (nested grids)")
        low, high = map(float, guidance_range)
        if not 0 <= low <= high:
            raise ValueError(f"guidance range must satisfy 0 <= min <= max, got {guidance_range}")
        # Caption dropout is meaningless here: the guidance input replaces the empty caption.
        super().__init__(student_config, FlowMatchingConfig(), replace(optim, caption_dropout=0.0), null_text,
                         init_weights=init_weights)
        # In a tuple so that a DiT teacher is not registered as a submodule: it is frozen, and must stay out of the
        # optimiser, the checkpoints and the state dict (a checkpoint holds the student, its EMA and nothing else).
        self._teacher = (teacher,)
        self.phase, self.guidance_range, self.val_seed = phase, (low, high), val_seed
        self.register_buffer("grid", grid.float().clone(), persistent=False)
        self.register_buffer("fine_grid", (fine_grid if fine_grid is not None else grid).float().clone(),
                             persistent=False)

    @property
    def teacher(self) -> Any:
        """The frozen target model: a :class:`TeacherEnsemble` (guidance phase) or the previous student (a round)."""
        return self._teacher[0]

    @property
    def metric_name(self) -> str:
        """Prefix of this phase's logged losses: 'guidance' or 'round<N steps>'."""
        return "guidance" if self.phase == "guidance" else f"steps{len(self.grid) - 1}"

    def on_fit_start(self) -> None:
        """Teachers are not submodules (never checkpointed): move them to the student's device."""
        self._move_teacher()

    def on_validation_start(self) -> None:  # noqa: D102
        self._move_teacher()

    def _move_teacher(self) -> None:
        self.teacher.to(self.device)  # a DiT or a TeacherEnsemble

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(grid indices [B] of t_a, guidance scales w [B]) for a batch; indices exclude t = 1."""
        steps = len(self.grid) - 1
        index = torch.randint(0, steps, (batch_size,), generator=generator)
        low, high = self.guidance_range
        w = low + (high - low) * torch.rand(batch_size, generator=generator)
        return index.to(self.device), w.to(self.device)

    def distill_loss(self, model: DiT, group: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE (float32) between `model`'s velocity and the phase's target on one same-shape group."""
        x1 = group["x"]
        tokens, mask, pooled = group["text_tokens"], group["text_mask"].bool(), group["text_pooled"]
        batch = x1.shape[0]
        index, w = self.draw(batch, generator)
        noise = torch.randn(x1.shape, generator=generator).to(x1) if generator is not None else torch.randn_like(x1)
        t_a = self.grid[index]  # [B]
        x_a, _ = interpolate(noise, x1, t_a, self.flow.sigma_min)
        if self.phase == "guidance":
            target = self.teacher(x_a, t_a, tokens, mask, pooled, w)
        else:
            t_b, t_c = self.fine_grid[2 * index + 1], self.grid[index + 1]
            target = two_step_target(self.teacher, x_a, t_a, t_b, t_c, tokens, mask, pooled, w)
        prediction = model(x_a, t_a, tokens, mask, pooled, guidance=w)
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Sample-weighted distillation loss over the step's groups; logs train/<phase>_loss."""
        groups = batch["groups"]
        total = sum(g["x"].shape[0] for g in groups)
        loss = torch.zeros((), device=groups[0]["x"].device)
        for group in groups:
            loss = loss + self.distill_loss(self.model, group) * (group["x"].shape[0] / total)
        self.log(f"train/{self.metric_name}_loss", loss, prog_bar=True, batch_size=total)
        # Under the name progress lines and checkpoints read, but not to MLflow: every phase restarts at step 0.
        self.log("train/loss", loss, batch_size=total, logger=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The EMA's loss with noise, t and w from a fixed seed per batch: changes reflect the weights only."""
        generator = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        groups = batch["groups"]
        total = sum(g["x"].shape[0] for g in groups)
        loss = torch.zeros((), device=groups[0]["x"].device)
        for group in groups:
            loss = loss + self.distill_loss(self.ema, group, generator) * (group["x"].shape[0] / total)
        self.log(f"val/{self.metric_name}_loss", loss, batch_size=total)
        self.log("val/loss", loss, batch_size=total, logger=False)
        return loss


def frozen_copy(model: DiT) -> DiT:
    """An eval-mode, gradient-free copy of a student (the teacher of the next progressive round)."""
    return copy.deepcopy(model).eval().requires_grad_(False)
