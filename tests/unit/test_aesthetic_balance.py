"""Aesthetic scorers (default heuristic, human-trained head), concept balancing and QT-set selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from components.config import AestheticConfig
from components.curate.aesthetic import (
    HEAD_FILE,
    LABELS_FILE,
    AestheticHead,
    DefaultAestheticScorer,
    LearnedAestheticScorer,
    load_aesthetic_scorer,
    review_labels,
)
from components.curate.balance import balance_weights, cluster_embeddings, select_quality_tuning_set
from models.vision_features import ImageFeatureExtractor

TUXPAINT = Path("/usr/share/tuxpaint/stamps")


def _stamp(path: Path) -> np.ndarray:
    """A Tux Paint stamp as RGB uint8, its transparency composited over white (as curation does)."""
    image = Image.open(path).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    return np.asarray(canvas.convert("RGB"))


def _blurred(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(max(image.shape[:2]) / 150)))


def _washed_out(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float64) * 0.45 + 140).clip(0, 255).astype(np.uint8)


def _noisy(image: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 20, image.shape)
    return (image.astype(np.float64) + noise).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- default scorer

_PHOTOS = {"astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea, "coffee": skimage.data.coffee,
           "rocket": skimage.data.rocket}
_STAMPS = ["animals/mammals/badger.png", "vehicles/auto/sedan.png", "food/dessert/cartoon/birthday_cake.png"]


def _test_images() -> dict[str, np.ndarray]:
    images = {name: load() for name, load in _PHOTOS.items()}
    for relative in _STAMPS:
        path = TUXPAINT / relative
        if not path.is_file():  # the stamp set moved things around: take any stamp of that category
            path = sorted((TUXPAINT / relative.split("/")[0]).rglob("*.png"))[0]
        images[path.stem] = _stamp(path)
    return images


@pytest.mark.parametrize("name, image", list(_test_images().items()))
def test_default_scorer_prefers_the_crisp_original_over_each_degradation(name: str, image: np.ndarray) -> None:
    versions = {"original": image, "blurred": _blurred(image), "washed out": _washed_out(image),
                "noisy": _noisy(image), "all three": _noisy(_washed_out(_blurred(image)))}
    scores = dict(zip(versions, DefaultAestheticScorer().score(list(versions.values()), None)))
    assert all(0.0 <= s <= 1.0 for s in scores.values()), scores
    for degraded in ("blurred", "washed out", "noisy", "all three"):
        assert scores["original"] > scores[degraded], f"{name}: {scores}"
    assert scores["all three"] < min(scores["blurred"], scores["washed out"], scores["noisy"]), f"{name}: {scores}"


def test_default_scorer_is_deterministic_and_checks_its_input() -> None:
    image = skimage.data.coffee()
    scorer = DefaultAestheticScorer()
    assert scorer.score([image, image[::2, ::3].copy()], np.zeros((2, 1280))).tolist() == \
        scorer.score([image, image[::2, ::3].copy()], np.zeros((2, 1280))).tolist()
    with pytest.raises(ValueError, match="RGB uint8"):
        scorer.score([image.astype(np.float32)], np.zeros((1, 1280)))
    with pytest.raises(ValueError, match="pair up"):
        scorer.score([image], np.zeros((2, 1280)))
    blank = np.full((40, 40, 3), 128, dtype=np.uint8)
    assert scorer.score([blank], None)[0] < scorer.score([image], None)[0]


# --------------------------------------------------------------------------- learned head

def _category_stamps(category: str, count: int) -> list[Path]:
    stamps = sorted((TUXPAINT / category).rglob("*.png"))
    return stamps[:: max(1, len(stamps) // count)][:count]


@pytest.fixture(scope="module")
def animals_vs_others(single_thread) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of 30 animal stamps (label 1) and 30 vehicle/food/town stamps (label 0)."""
    if not TUXPAINT.is_dir():
        pytest.fail("Tux Paint stamps are missing: run `make test` (it installs tuxpaint-stamps-default)")
    accept = _category_stamps("animals", 30)
    reject = _category_stamps("vehicles", 10) + _category_stamps("food", 10) + _category_stamps("town", 10)
    pixels = np.stack([np.asarray(Image.fromarray(_stamp(p)).resize((128, 128))) for p in accept + reject])
    extractor = ImageFeatureExtractor(input_size=128)
    features = extractor.features(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels = np.array([1] * len(accept) + [0] * len(reject))
    return features, labels


def test_head_learns_a_real_category_from_labels_and_generalises(animals_vs_others) -> None:
    features, labels = animals_vs_others
    order = np.random.default_rng(0).permutation(len(labels))
    train, held_out = order[:40], order[40:]
    head = AestheticHead().fit(features[train], labels[train])
    probabilities = head.predict(features[held_out])
    accuracy = float(np.mean((probabilities >= 0.5) == labels[held_out]))
    assert accuracy >= 0.75, accuracy  # chance is 0.5
    # Accepted held-out items score higher on average: usable as a ranking score.
    assert probabilities[labels[held_out] == 1].mean() > probabilities[labels[held_out] == 0].mean() + 0.2
    assert head.metadata["n_labels"] == 40 and head.metadata["feature_dim"] == 1280
    assert head.metadata["train_accuracy"] >= 0.95 and head.metadata["cv_accuracy"] >= 0.7
    # Same labels, same head.
    assert np.array_equal(AestheticHead().fit(features[train], labels[train]).predict(features), head.predict(features))


def test_head_round_trips_through_safetensors_and_refuses_pickles(animals_vs_others, tmp_path: Path) -> None:
    features, labels = animals_vs_others
    head = AestheticHead().fit(features[:12:1].tolist() + features[-12:].tolist(),
                               labels[:12].tolist() + labels[-12:].tolist())
    path = head.save(tmp_path / HEAD_FILE)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["n_labels"] == 24 and sidecar["n_accept"] == 12 and sidecar["feature_dim"] == 1280
    assert "train_accuracy" in sidecar and sidecar["cv_accuracy"] is not None
    loaded = AestheticHead.load(path)
    assert np.allclose(loaded.predict(features), head.predict(features))

    scorer = load_aesthetic_scorer(AestheticConfig(review_dir=str(tmp_path)))
    assert isinstance(scorer, LearnedAestheticScorer)
    images = [np.zeros((8, 8, 3), np.uint8)] * len(features)
    assert np.allclose(scorer.score(images, features), head.predict(features))

    pickled = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(3)}, pickled)
    with pytest.raises(ValueError, match="safetensors only"):
        AestheticHead.load(pickled)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match="not a valid safetensors"):
        AestheticHead.load(fake)
    with pytest.raises(ValueError, match=r"\[N, 1280\]"):
        head.predict(features[:, :100])


def test_head_needs_two_labels_of_each_class() -> None:
    features = np.random.default_rng(0).normal(size=(5, 16))
    with pytest.raises(ValueError, match=r"at least 2 'accept' and 2 'reject'.*got 1 accept and 4 reject"):
        AestheticHead().fit(features, np.array([1, 0, 0, 0, 0]))


def test_scorer_and_labels_come_from_the_review_dir(tmp_path: Path) -> None:
    assert isinstance(load_aesthetic_scorer(AestheticConfig()), DefaultAestheticScorer)
    assert review_labels(AestheticConfig()) == {}
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        load_aesthetic_scorer(AestheticConfig(review_dir=str(tmp_path)))
    pd.DataFrame({"id": ["a", "b"], "label": ["accept", "reject"], "notes": ["", ""]}).to_parquet(
        tmp_path / LABELS_FILE)
    assert review_labels(AestheticConfig(review_dir=str(tmp_path))) == {"a": "accept", "b": "reject"}


# --------------------------------------------------------------------------- balancing

def _blobs(sizes: list[int], seed: int = 0, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 3
    points = np.concatenate([centres[i] + rng.normal(size=(s, dim)) * 0.3 for i, s in enumerate(sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(truth))
    return points[order].astype(np.float32), truth[order]


def test_kmeans_recovers_concepts_of_very_different_sizes_deterministically() -> None:
    points, truth = _blobs([400, 100, 25, 9, 4])
    labels = cluster_embeddings(points, 5)
    assert labels.dtype == np.int64 and labels.shape == truth.shape
    # Same partition as the truth (cluster numbers may differ).
    assert len({(a, b) for a, b in zip(labels, truth)}) == 5
    assert np.array_equal(labels, cluster_embeddings(points, 5))
    assert cluster_embeddings(points, 0).max() + 1 == round(np.sqrt(len(points) / 2))
    assert cluster_embeddings(points[:3], 10).tolist() == [0, 1, 2]
    assert cluster_embeddings(np.empty((0, 8)), 3).shape == (0,)


def test_balance_weights_flatten_the_cluster_histogram() -> None:
    sizes = [400, 100, 25, 9, 4]
    points, _ = _blobs(sizes)
    clusters = cluster_embeddings(points, 5)
    weights = balance_weights(clusters)
    assert weights.mean() == pytest.approx(1.0)
    counts = np.bincount(clusters)
    # Expected share of each cluster when sampling by weight: proportional to sqrt(size).
    share = np.bincount(clusters, weights=weights) / weights.sum()
    assert np.allclose(share / share.max(), np.sqrt(counts / counts.max()))
    # Drawing samples with these weights: the biggest concept falls from 74% of the data to about
    # half (sqrt shares 20:10:5:3:2), the smallest rises from 0.7% to about 5%.
    draws = np.random.default_rng(1).choice(len(clusters), size=20000, p=weights / weights.sum())
    drawn = np.bincount(clusters[draws], minlength=5) / 20000
    biggest, smallest = np.argmax(counts), np.argmin(counts)
    assert counts[biggest] / counts.sum() > 0.7 and drawn[biggest] < 0.55
    assert counts[smallest] / counts.sum() < 0.01 and drawn[smallest] > 0.04
    assert drawn[biggest] / drawn[smallest] == pytest.approx(np.sqrt(counts[biggest] / counts[smallest]), rel=0.25)


# --------------------------------------------------------------------------- quality-tuning set

def _manifest(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "id": [f"s{i:03d}" for i in range(n)],
        "split": ["val" if i % 10 == 9 else "train" for i in range(n)],
        "aesthetic": rng.random(n),
        "quality": rng.random(n),
        "brisque": rng.random(n) * 100,
        "cluster": np.arange(n) % 4,
    })


def test_qt_set_is_the_top_ranked_train_rows_with_a_cluster_cap() -> None:
    manifest = _manifest()
    selected = select_quality_tuning_set(manifest, top_k=10, per_cluster_cap=2,
                                         score_columns={"aesthetic": 0.5, "quality": 0.5}, labels={})
    assert len(selected) == 8  # four clusters x cap 2
    assert selected["qt_rank"].tolist() == list(range(1, 9))
    assert (selected["split"] == "train").all()
    assert selected["cluster"].value_counts().max() <= 2
    assert selected["qt_score"].is_monotonic_decreasing
    uncapped = select_quality_tuning_set(manifest, top_k=5, per_cluster_cap=None,
                                         score_columns={"aesthetic": 1.0}, labels={})
    train = manifest[manifest["split"] == "train"]
    assert uncapped["id"].tolist() == train.nlargest(5, "aesthetic")["id"].tolist()
    # A negative weight prefers low values (BRISQUE: lower is better).
    best_brisque = select_quality_tuning_set(manifest, top_k=1, per_cluster_cap=None,
                                             score_columns={"brisque": -1.0}, labels={})
    assert best_brisque["id"].iloc[0] == train.nsmallest(1, "brisque")["id"].iloc[0]


def test_qt_set_puts_human_accepts_first_drops_rejects_and_breaks_ties_by_id() -> None:
    manifest = _manifest()
    train = manifest[manifest["split"] == "train"]
    best = train.nlargest(3, "aesthetic")["id"].tolist()
    worst = train.nsmallest(2, "aesthetic")["id"].tolist()
    labels = {best[0]: "reject", worst[0]: "accept", worst[1]: "accept", "not-in-manifest": "accept"}
    selected = select_quality_tuning_set(manifest, top_k=4, per_cluster_cap=1,
                                         score_columns={"aesthetic": 1.0}, labels=labels)
    assert set(selected["id"].iloc[:2]) == set(worst)  # accepts first, even when capped clusters collide
    assert best[0] not in set(selected["id"])
    ties = pd.DataFrame({"id": ["c", "a", "b"], "split": "train", "aesthetic": [0.5, 0.5, 0.5]})
    assert select_quality_tuning_set(ties, top_k=3, per_cluster_cap=None, score_columns={"aesthetic": 1.0},
                                     labels={})["id"].tolist() == ["a", "b", "c"]


def test_qt_set_names_a_missing_score_column() -> None:
    with pytest.raises(ValueError, match=r"no score column \['alignment'\]"):
        select_quality_tuning_set(_manifest(), top_k=3, per_cluster_cap=None,
                                  score_columns={"aesthetic": 0.5, "alignment": 0.5}, labels={})
    with pytest.raises(ValueError, match="cluster"):
        select_quality_tuning_set(_manifest().drop(columns="cluster"), top_k=3, per_cluster_cap=2,
                                  score_columns={"aesthetic": 1.0}, labels={})
