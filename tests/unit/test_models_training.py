"""Lightning flow-matching training on a toy two-image dataset (tiny preset, CPU, bf16-mixed)."""

import statistics

import lightning
import pytest
import torch

from models.dit import PRESETS
from models.flow import FlowMatchingConfig
from models.text_encoder import TextEmbeddings
from models.training import FlowMatchingModule, GroupSpec, OptimConfig, StepPlan

CONFIG = PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _toy_text(seed: int = 0) -> TextEmbeddings:
    """Two distinct fake captions (5 real tokens each) in the MiniLM embedding format."""
    g = torch.Generator().manual_seed(seed)
    L, D = CONFIG.max_text_tokens, CONFIG.text_dim
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :5] = True
    tokens = torch.randn(2, L, D, generator=g) * mask[..., None]
    pooled = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1)
    return TextEmbeddings(tokens, mask, pooled)


def _toy_images() -> torch.Tensor:
    """A solid red and a solid blue image, uint8 [2,3,H,W]."""
    images = torch.zeros(2, 3, CONFIG.image_size, CONFIG.image_size, dtype=torch.uint8)
    images[0, 0] = 255
    images[1, 2] = 255
    return images


class ToySteps(torch.utils.data.Dataset):
    """The toy images as 1-frame videos, batched per optimiser step by a StepPlan (the training batch format)."""

    def __init__(self, repeats: int = 4, batch_size: int = 8, seed: int = 0) -> None:
        text = _toy_text()
        self.images = _toy_images().repeat(repeats, 1, 1, 1)
        self.tokens, self.mask, self.pooled = (t.repeat(repeats, *([1] * (t.ndim - 1)))
                                               for t in (text.tokens, text.mask, text.pooled))
        self.plan = StepPlan([GroupSpec("image", self.images.shape[0])], {"image": batch_size}, seed)

    def batch(self, indices) -> dict:
        """Samples `indices` in the FlowMatchingModule batch format."""
        index = torch.as_tensor(indices)
        x = (self.images[index].float() / 127.5 - 1.0).unsqueeze(2)  # [B, 3, 1, H, W]
        return {"groups": [{"x": x, "text_tokens": self.tokens[index], "text_mask": self.mask[index],
                            "text_pooled": self.pooled[index], "media": "image"}]}

    def __getitem__(self, step: int) -> dict:
        ((_, indices),) = self.plan.step(step)
        return self.batch(indices)


def _step_loader(dataset: ToySteps, start_step: int = 0) -> torch.utils.data.DataLoader:
    from models.training import StepSampler

    return torch.utils.data.DataLoader(dataset, sampler=StepSampler(start_step), batch_size=None)


def _trainer(max_steps: int, callbacks=()) -> lightning.Trainer:
    return lightning.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=max_steps,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


class _LossRecorder(lightning.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_step_plan_is_a_function_of_seed_and_step_and_covers_both_streams():
    groups = [GroupSpec("image", 10), GroupSpec("image", 30), GroupSpec("video", 5)]
    plan = StepPlan(groups, {"image": 4, "video": 2}, seed=5)
    first = [plan.step(t) for t in range(50)]
    for entry in first:
        assert [len(indices) for _, indices in entry] == [4, 2]  # one image group and one video group per step
        (image_group, image_idx), (video_group, video_idx) = entry
        assert image_group in (0, 1) and video_group == 2
        assert len(set(image_idx)) == 4  # no repeats within a step
        assert max(image_idx) < groups[image_group].size
    share_big = sum(entry[0][0] == 1 for entry in first) / len(first)
    assert 0.55 < share_big < 0.95  # buckets drawn in proportion to their size (30 of 40)
    torch.manual_seed(123)  # the global RNG plays no part
    again = StepPlan(groups, {"image": 4, "video": 2}, seed=5)
    assert [again.step(t) for t in range(37, 42)] == first[37:42]
    assert StepPlan(groups, {"image": 4, "video": 2}, seed=6).step(0) != first[0]
    with pytest.raises(ValueError, match="no video samples"):
        StepPlan([GroupSpec("image", 3)], {"image": 1, "video": 1}, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        GroupSpec("image", 3, (1.0, -1.0, 1.0))


def test_mixed_image_and_video_step_weights_the_loss_by_samples():
    torch.manual_seed(0)
    module = FlowMatchingModule(CONFIG, optim=OptimConfig(caption_dropout=0.0))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = ToySteps(repeats=2).batch([0, 1, 2])["groups"][0]
    text = {k: images[k][:2] for k in ("text_tokens", "text_mask", "text_pooled")}
    video = {"x": torch.randn(2, 3, 3, CONFIG.image_size, CONFIG.image_size), **text, "media": "video"}
    torch.manual_seed(1)
    mixed = module.training_step({"groups": [images, video]}, 0)
    torch.manual_seed(1)
    image_loss = module._group_loss(images, dropout=True)
    video_loss = module._group_loss(video, dropout=True)
    assert torch.allclose(mixed, (3 * image_loss + 2 * video_loss) / 5)
    latents = module.generate(_toy_text(), steps=2, guidance_scale=1.0, frames=3)
    assert latents.shape == (2, 3, 3, CONFIG.image_size, CONFIG.image_size)


def test_thirty_bf16_steps_reduce_loss_update_ema_and_generate():
    torch.manual_seed(0)
    loader = _step_loader(ToySteps())
    module = FlowMatchingModule(CONFIG, FlowMatchingConfig(), OptimConfig(lr=3e-3, warmup_steps=5))
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    recorder = _LossRecorder()

    _trainer(30, [recorder]).fit(module, loader)

    losses = recorder.losses
    assert len(losses) == 30
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    print(f"train/loss first5={first:.3f} last5={last:.3f}")
    assert last < 0.75 * first

    raw, ema = module.model.state_dict(), module.ema.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA lags the raw weights...
    assert any(not torch.equal(initial[k], ema[k]) for k in raw)  # ...but has moved off the init
    assert all(not p.requires_grad for p in module.ema.parameters())

    images = module.generate(_toy_text(), steps=8, guidance_scale=2.0, seed=0, solver="euler")[:, :, 0]
    assert images.shape == (2, 3, CONFIG.image_size, CONFIG.image_size)
    assert torch.isfinite(images).all()
    images = images.clamp(-1, 1)
    red, blue = images.mean(dim=(2, 3))  # per-channel means, [3] each
    assert red[0] > 0.3 and red[2] < -0.3, red  # the caption of the red image makes a red image
    assert blue[2] > 0.3 and blue[0] < -0.3, blue
    again = module.generate(_toy_text(), steps=8, guidance_scale=2.0, seed=0, solver="euler")[:, :, 0]
    assert torch.equal(images, again.clamp(-1, 1))
    heun = module.generate(_toy_text(), steps=4, guidance_scale=1.0, seed=1, solver="heun")[:, :, 0]
    assert heun.shape == images.shape and torch.isfinite(heun).all()


def test_validation_loss_is_deterministic():
    torch.manual_seed(0)
    module = FlowMatchingModule(CONFIG, optim=OptimConfig(caption_dropout=0.0))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dataset = ToySteps(repeats=2)
    loader = torch.utils.data.DataLoader([dataset.batch([0, 1, 2, 3])], batch_size=None)
    trainer = _trainer(1)
    first = trainer.validate(module, loader, verbose=False)[0]["val/loss"]
    second = trainer.validate(module, loader, verbose=False)[0]["val/loss"]
    assert first == second and first > 0


def test_null_text_buffers_init_weights_and_warmup():
    donor = FlowMatchingModule(CONFIG)
    with torch.no_grad():
        for p in donor.model.parameters():
            p.add_(1.0)
    null = _toy_text().select(0)
    module = FlowMatchingModule(
        CONFIG, optim=OptimConfig(lr=1e-3, warmup_steps=10), null_text=null, init_weights=donor.model.state_dict()
    )
    for k, v in donor.model.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v)
        assert torch.equal(module.ema.state_dict()[k], v)
    assert torch.equal(module.null_tokens, null.tokens) and module.null_mask.dtype == torch.bool
    assert {"null_tokens", "null_mask", "null_pooled"} <= set(dict(module.named_buffers()))

    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.ema.parameters()}


def test_caption_dropout_replaces_whole_captions_with_null():
    null = TextEmbeddings(torch.full((1, 32, 384), 7.0), torch.ones(1, 32, dtype=torch.bool), torch.full((1, 384), 7.0))
    module = FlowMatchingModule(CONFIG, optim=OptimConfig(caption_dropout=0.5), null_text=null)
    text = _toy_text()
    tokens, mask, pooled = (t.repeat(32, *([1] * (t.ndim - 1))) for t in (text.tokens, text.mask, text.pooled))
    torch.manual_seed(0)
    d_tokens, d_mask, d_pooled = module._apply_caption_dropout(tokens, mask, pooled)
    dropped = (d_pooled == 7.0).all(dim=1)
    assert 0 < dropped.sum() < 64
    assert (d_tokens[dropped] == 7.0).all() and d_mask[dropped].all()
    assert torch.equal(d_tokens[~dropped], tokens[~dropped]) and torch.equal(d_mask[~dropped], mask[~dropped])


def test_step_sampler_gives_each_data_parallel_rank_its_own_batch():
    from itertools import islice

    from models.training import StepSampler

    assert list(islice(StepSampler(3), 3)) == [3, 4, 5]
    ranks = [list(islice(StepSampler(2, rank=r, world_size=3), 2)) for r in range(3)]
    assert ranks == [[6, 9], [7, 10], [8, 11]]  # step 2 -> batches 6, 7, 8; step 3 -> 9, 10, 11
    with pytest.raises(ValueError, match="rank"):
        StepSampler(0, rank=2, world_size=2)
