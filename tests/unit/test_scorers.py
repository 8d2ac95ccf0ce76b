"""Curation scorers on real images and the real shipped models: values a user would act on."""

from __future__ import annotations

import typing

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageFont

from components.config import CurateConfig
from components.curate import scorers as S
from components.media import decode_image, image_to_array, technical_quality
from tests.conftest import TUXPAINT

# Small models on a 2-core box: one torch thread (ONNX Runtime follows it) is the fast setting.
pytestmark = pytest.mark.usefixtures("single_thread")

ALL_BUT_AESTHETIC = ["technical", "brisque", "ocr", "safety", "features"]


def _analysis_copy(rgb: np.ndarray, side: int = 224) -> np.ndarray:
    """Shorter side at most `side`, never upscaled (what curation hands the scorers)."""
    h, w = rgb.shape[:2]
    scale = side / min(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def _stamp(relative: str) -> np.ndarray:
    decoded = decode_image(TUXPAINT / relative)
    assert decoded.ok, decoded.detail
    return _analysis_copy(image_to_array(decoded.image))


def _config(**overrides: typing.Any) -> CurateConfig:
    return CurateConfig(scorers=ALL_BUT_AESTHETIC, **overrides)


def _batch(images: list[np.ndarray], captions: list[str | None] | None = None) -> S.ScoreBatch:
    return S.ScoreBatch([f"s{i}" for i in range(len(images))], images, captions or [None] * len(images))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return _analysis_copy(skimage.data.chelsea())  # a tabby cat, a real photo


def test_columns_and_order_cover_every_configurable_scorer() -> None:
    """Every scorer a recipe may name has columns listed without loading a model, and a builder."""
    allowed = typing.get_args(typing.get_args(CurateConfig.model_fields["scorers"].annotation)[0])
    assert set(S.SCORE_COLUMNS) == set(allowed) == set(S.SCORER_ORDER)
    built = S.build_scorers(CurateConfig(scorers=["aesthetic", "technical", "features"]))
    assert [s.name for s in built] == ["technical", "features", "aesthetic"]
    assert all(s.columns == S.SCORE_COLUMNS[s.name] for s in built)


def test_score_batch_rejects_malformed_input_naming_the_sample() -> None:
    with pytest.raises(ValueError, match="'b'.*uint8"):
        S.ScoreBatch(["a", "b"], [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)], [None, None])
    with pytest.raises(ValueError, match="same length"):
        S.ScoreBatch(["a"], [], [None])


def test_technical_matches_media_scores_on_a_photo(photo: np.ndarray) -> None:
    """No uniform backdrop: the same numbers as components.media.technical_quality, mapped to 0..1."""
    ours = S.technical_scores(photo)
    reference = technical_quality(photo)
    assert ours["background"] == 0.0
    assert ours["quality"] == pytest.approx(reference["quality"])
    assert ours["sharpness"] == pytest.approx(reference["sharpness"] / (reference["sharpness"] + 100))
    blurred = S.technical_scores(cv2.GaussianBlur(photo, (9, 9), 3))
    assert blurred["sharpness"] < ours["sharpness"] - 0.2


def test_clip_art_on_white_is_not_counted_as_blown_out() -> None:
    """A Tux Paint stamp composited over white: the backdrop is found and not counted as clipped."""
    frog = _stamp("animals/amphibians/frog-1.png")
    naive = np.mean(cv2.cvtColor(frog, cv2.COLOR_RGB2GRAY) >= 253)
    scores = S.technical_scores(frog)
    assert naive > 0.3  # the whole-image measure would call this a third blown out
    assert scores["background"] > 0.3
    assert scores["clipped"] < 0.05
    assert 0.2 < scores["brightness"] < 0.8


def test_odd_images_get_documented_values() -> None:
    """1-pixel-tall, 8x8 and all-white images never raise; values are defined or NaN as documented."""
    sliver = np.full((1, 200, 3), 90, np.uint8)
    tiny = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    white = np.full((64, 64, 3), 255, np.uint8)
    scorers = S.build_scorers(_config())
    out = S.score_batch(scorers, _batch([sliver, tiny, white], [None, "noise", "a white page"]))
    assert out["clipped"][2] == 1.0 and out["background"][2] == 1.0 and out["brightness"][2] == 1.0
    assert out["sharpness"][0] == 0.0
    assert np.isnan(out["brisque"]).all()  # too small (1 px, 8 px) or textureless (white)
    np.testing.assert_array_equal(out["text_area"], [0.0, 0.0, 0.0])
    assert np.all((out["unsafe"] >= 0) & (out["unsafe"] <= 1))
    assert np.isnan(out["alignment"][0]) and np.all(np.isfinite(out["alignment"][1:]))
    for column in ("quality", "sharpness", "colorfulness", "brightness", "clipped", "text_boxes", "unsafe"):
        assert np.all(np.isfinite(out[column])), column


def test_brisque_agrees_with_the_package_and_ranks_distortion(photo: np.ndarray) -> None:
    """Our numpy-2 workaround gives the package's own score; noise and blur score worse; deterministic."""
    from brisque import BRISQUE

    class NumpyOneSemantics(BRISQUE):  # what the package computed before numpy 2
        def scale_features(self, features):  # type: ignore[no-untyped-def]
            return super().scale_features([np.ravel(f)[0] for f in features])

    with np.errstate(all="ignore"):
        reference = NumpyOneSemantics(url=False).score(photo)
    scorer = S.BrisqueScorer(_config())
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 30, photo.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(photo, (9, 9), 3)
    first = scorer.score(_batch([photo, noisy, blurred]), {})["brisque"]
    again = scorer.score(_batch([photo, noisy, blurred]), {})["brisque"]
    assert first[0] == pytest.approx(reference, abs=1e-6)
    assert first[0] < 30 and first[1] > first[0] + 20 and first[2] > first[0] + 20
    np.testing.assert_array_equal(first, again)


def _rendered(text: str | None, size: tuple[int, int] = (224, 160), font_size: int = 28) -> np.ndarray:
    image = Image.new("RGB", size, (245, 235, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 100, 210, 150), fill=(200, 60, 40))  # some non-text content in both
    if text:
        draw.text((10, 40), text, fill=(20, 20, 20), font=ImageFont.load_default(size=font_size))
    return np.asarray(image).copy()


def test_ocr_finds_rendered_text_and_nothing_on_a_plain_picture() -> None:
    out = S.OcrScorer(_config()).score(_batch([_rendered("SALE 50% OFF"), _rendered(None)]), {})
    assert out["text_boxes"][0] >= 1 and 0.03 < out["text_area"][0] < 0.5
    assert out["text_boxes"][1] == 0 and out["text_area"][1] == 0.0


def test_safety_classes_are_nudenet_labels_and_clip_art_is_not_flagged() -> None:
    import nudenet.nudenet

    labels = set(getattr(nudenet.nudenet, "__labels"))
    assert S.EXPLICIT_CLASSES <= labels
    assert not any("COVERED" in name or name.startswith("FACE") for name in S.EXPLICIT_CLASSES)
    images = [_stamp("animals/mammals/equines/horse.png"), np.full((64, 64, 3), 255, np.uint8)]
    unsafe = S.SafetyScorer(_config()).score(_batch(images), {})["unsafe"]
    assert unsafe[1] == 0.0
    assert np.all(unsafe < 0.6)


def test_class_names_follow_the_logit_order(photo: np.ndarray) -> None:
    """The shipped names line up with the network's logits: the cat photo is tagged as a cat."""
    names = S.imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[948] == "Granny Smith"
    out = S.FeaturesScorer(_config()).score(_batch([photo]), {})
    top5 = [names[i] for i in np.argsort(-out["class_probs"][0])[:5]]
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5)


def test_features_tags_and_alignment(photo: np.ndarray) -> None:
    """Features per image, readable tags, and a caption about the picture aligns better than one that is not."""
    coffee = _analysis_copy(skimage.data.coffee())
    batch = _batch([photo, photo, coffee, coffee], ["a cat lying down", "a steam locomotive", "a cup of coffee", None])
    out = S.score_batch(S.build_scorers(CurateConfig(scorers=["features"], captions={"tagger_labels": 3})), batch)
    assert out["features"].shape == (4, 1280) and out["features"].dtype == np.float32
    np.testing.assert_allclose(out["features"][0], out["features"][1], rtol=1e-5)
    assert [len(t) for t in out["tags"]] == [3, 3, 3, 3]
    assert all(tag in S.imagenet_class_names() and "_" not in tag for tags in out["tags"] for tag in tags)
    alignment = out["alignment"]
    assert alignment[0] > alignment[1] + 0.1
    assert 0 <= alignment[2] <= 1 and np.isnan(alignment[3])


def test_embed_texts_matches_the_text_encoder() -> None:
    """Dynamic padding gives TextEncoder.encode's pooled embeddings."""
    from models.text_encoder import TextEncoder

    texts = ["a red apple", "a very long caption about a small brown dog running on a beach at sunset"]
    reference = TextEncoder(max_tokens=64).encode(texts).pooled.numpy()
    np.testing.assert_allclose(S.embed_texts(texts), reference, atol=1e-5)


def test_score_batch_runs_the_stack_on_stamps_and_handles_empty_batches() -> None:
    stamps = [_stamp("animals/mammals/equines/horse.png"), _stamp("food/fruit/mango.png")]
    scorers = S.build_scorers(_config())
    out = S.score_batch(scorers, _batch(stamps, ["A horse.", None]))
    for name in ALL_BUT_AESTHETIC:
        for column in S.SCORE_COLUMNS[name]:
            assert out[column].shape == (2,) and out[column].dtype == np.float64, column
    assert len(out["tags"]) == 2
    empty = S.score_batch(scorers, _batch([]))
    assert all(empty[c].shape == (0,) for name in ALL_BUT_AESTHETIC for c in S.SCORE_COLUMNS[name])
    assert empty["features"].shape == (0, 1280) and empty["tags"] == []


def test_aesthetic_adapter_scores_from_context_features(photo: np.ndarray) -> None:
    scorers = S.build_scorers(CurateConfig(scorers=["features", "aesthetic"]))
    out = S.score_batch(scorers, _batch([photo, np.full((64, 64, 3), 128, np.uint8)]))
    assert out["aesthetic"].shape == (2,)
    assert np.all((out["aesthetic"] >= 0) & (out["aesthetic"] <= 1))
    with pytest.raises(RuntimeError, match="features"):
        S.AestheticScorer(CurateConfig(scorers=["features", "aesthetic"])).score(_batch([photo]), {})
