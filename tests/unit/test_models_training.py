"""Lightning flow-matching training on a toy two-image dataset (tiny preset, CPU, bf16-mixed)."""

import statistics

import lightning
import pytest
import torch

from models.dit import PRESETS
from models.flow import FlowMatchingConfig
from models.text_encoder import TextEmbeddings
from models.training import CaptionedImageDataset, FlowMatchingModule, OptimConfig

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


def _toy_dataset(repeats: int = 4) -> CaptionedImageDataset:
    text = _toy_text()
    repeated = TextEmbeddings(
        text.tokens.repeat(repeats, 1, 1), text.mask.repeat(repeats, 1), text.pooled.repeat(repeats, 1)
    )
    return CaptionedImageDataset(_toy_images().repeat(repeats, 1, 1, 1), repeated)


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


def test_dataset_converts_uint8_to_unit_range_and_validates():
    ds = _toy_dataset(repeats=1)
    item = ds[0]
    assert item["image"].dtype == torch.float32
    assert item["image"][0].eq(1.0).all() and item["image"][1:].eq(-1.0).all()
    assert item["text_tokens"].shape == (CONFIG.max_text_tokens, CONFIG.text_dim)
    assert item["text_mask"].dtype == torch.bool and item["text_pooled"].shape == (CONFIG.text_dim,)
    with pytest.raises(ValueError, match="uint8"):
        CaptionedImageDataset(_toy_images().float(), _toy_text())
    with pytest.raises(ValueError, match="one caption per image"):
        CaptionedImageDataset(_toy_images()[:1], _toy_text())


def test_thirty_bf16_steps_reduce_loss_update_ema_and_generate():
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_toy_dataset(), batch_size=8, shuffle=True)
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

    images = module.generate(_toy_text(), steps=8, guidance_scale=2.0, seed=0, solver="euler")
    assert images.shape == (2, 3, CONFIG.image_size, CONFIG.image_size)
    assert torch.isfinite(images).all() and images.abs().max() <= 1.0
    red, blue = images.mean(dim=(2, 3))  # per-channel means, [3] each
    assert red[0] > 0.3 and red[2] < -0.3, red  # the caption of the red image makes a red image
    assert blue[2] > 0.3 and blue[0] < -0.3, blue
    again = module.generate(_toy_text(), steps=8, guidance_scale=2.0, seed=0, solver="euler")
    assert torch.equal(images, again)
    heun = module.generate(_toy_text(), steps=4, guidance_scale=1.0, seed=1, solver="heun")
    assert heun.shape == images.shape and torch.isfinite(heun).all()


def test_validation_loss_is_deterministic():
    torch.manual_seed(0)
    module = FlowMatchingModule(CONFIG, optim=OptimConfig(caption_dropout=0.0))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loader = torch.utils.data.DataLoader(_toy_dataset(repeats=2), batch_size=4)
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
