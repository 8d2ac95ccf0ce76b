"""Evaluation metrics on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from components.evaluate.metrics import (
    HEADLINE_METRICS,
    caption_alignment_chance,
    compare_paired,
    diversity,
    frame_change,
    frechet_distance,
    kernel_inception_distance,
    knn_caption_alignment,
    knn_category_accuracy,
    mean_confidence_interval,
    pairwise_win_rate,
    rank_normalise,
    wilson_interval,
)

DIM = 16


def _gauss(n: int, shift: float = 0.0, scale: float = 1.0, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """``n`` samples of N(shift * 1, scale^2 I)."""
    return np.random.default_rng(seed).normal(shift, scale, size=(n, dim))


def test_frechet_distance_of_set_with_itself_is_zero() -> None:
    """FD(a, a) = 0 up to round-off (and is never negative)."""
    a = _gauss(400)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_with_shift() -> None:
    """Equal covariances: FD ~= ||mu_a - mu_b||^2 = dim * shift^2, increasing in the shift."""
    a = _gauss(4000, seed=1)
    values = [frechet_distance(a, _gauss(4000, shift=s, seed=2)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(lo < hi for lo, hi in zip(values, values[1:], strict=False))
    assert values[0] < 0.1
    assert values[-1] == pytest.approx(DIM * 2.0**2, rel=0.05)


def test_frechet_distance_covariance_term() -> None:
    """N(0, I) vs N(0, 4I): Tr(I + 4I - 2*2I) = dim."""
    fd = frechet_distance(_gauss(4000, seed=3), _gauss(4000, scale=2.0, seed=4))
    assert fd == pytest.approx(DIM, rel=0.1)


def test_frechet_distance_singular_covariance_is_finite() -> None:
    """Fewer samples than dimensions (rank-deficient covariances) still yields a finite value."""
    a, b = _gauss(10, seed=5, dim=64), _gauss(12, shift=1.0, seed=6, dim=64)
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted() -> None:
    """Unbiased MMD^2 ~ 0 for two samples of one distribution; clearly > 0 after a shift."""
    a, b = _gauss(600, seed=7), _gauss(600, seed=8)
    same_mean, same_std = kernel_inception_distance(a, b, subsets=10, subset_size=150)
    shifted_mean, _ = kernel_inception_distance(a, _gauss(600, shift=0.5, seed=9), subsets=10, subset_size=150)
    assert abs(same_mean) < 0.05
    assert same_std >= 0
    assert shifted_mean > 10 * max(abs(same_mean), 0.01)
    # Same seed, same subsets: reproducible.
    assert kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=3) == kernel_inception_distance(
        a, b, subsets=5, subset_size=100, seed=3
    )


def _captioned_references(per_cat: int = 20, n_cats: int = 4, seed: int = 0):
    """Reference image features clustered by category, with per-category caption embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_cats, 32)) * 5
    caption_centres = rng.normal(size=(n_cats, 24))
    cats = np.repeat(np.arange(n_cats), per_cat)
    ref_feats = centres[cats] + rng.normal(size=(cats.size, 32))
    captions = caption_centres[cats] + 0.3 * rng.normal(size=(cats.size, 24))
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return centres, caption_centres / np.linalg.norm(caption_centres, axis=1, keepdims=True), ref_feats, captions, cats


def test_knn_caption_alignment_rewards_images_near_matching_references() -> None:
    """Generated images near references captioned like their prompt score higher than mismatched ones."""
    centres, prompt_bank, ref_feats, captions, _ = _captioned_references()
    rng = np.random.default_rng(1)
    prompt_cat = np.array([0, 1, 2, 3, 0, 1])
    prompts = prompt_bank[prompt_cat]
    matched = centres[prompt_cat] + rng.normal(size=(6, 32))
    mismatched = centres[(prompt_cat + 1) % 4] + rng.normal(size=(6, 32))

    good = knn_caption_alignment(matched, prompts, ref_feats, captions, k=5)
    bad = knn_caption_alignment(mismatched, prompts, ref_feats, captions, k=5)
    assert good.shape == (6,)
    assert np.all(good > bad)
    assert np.all(good > 0.8) and np.all(good <= 1.0 + 1e-9)
    # Mismatched content sits near the chance floor, well below matched content.
    chance = caption_alignment_chance(prompts, captions)
    assert chance.shape == (6,)
    assert np.all(good > chance + 0.3)


def test_knn_category_accuracy_perfect_and_zero() -> None:
    """Majority vote over clustered references: 1.0 when on-cluster, 0.0 when on the wrong cluster."""
    centres, _, ref_feats, _, cats = _captioned_references()
    rng = np.random.default_rng(2)
    prompt_cat = np.arange(4).repeat(3)
    on = centres[prompt_cat] + rng.normal(size=(12, 32))
    off = centres[(prompt_cat + 2) % 4] + rng.normal(size=(12, 32))
    labels = [f"cat{c}" for c in cats]
    prompt_labels = [f"cat{c}" for c in prompt_cat]
    assert knn_category_accuracy(on, prompt_labels, ref_feats, labels, k=5) == 1.0
    assert knn_category_accuracy(off, prompt_labels, ref_feats, labels, k=5) == 0.0


def test_knn_category_tie_goes_to_nearest_neighbour() -> None:
    """A 1-1 vote is decided by the closer reference."""
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    gen = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert knn_category_accuracy(gen, ["a", "b"], ref, ["a", "b"], k=2) == 1.0


def test_confidence_interval_contains_mean_and_narrows() -> None:
    """The t-interval brackets the mean, matches scipy, and shrinks with more samples."""
    rng = np.random.default_rng(3)
    small, large = rng.normal(5.0, 1.0, 20), rng.normal(5.0, 1.0, 2000)
    mean_s, lo_s, hi_s = mean_confidence_interval(small)
    mean_l, lo_l, hi_l = mean_confidence_interval(large)
    assert lo_s < mean_s < hi_s and lo_l < mean_l < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    ref_lo, ref_hi = scipy.stats.t.interval(0.95, df=19, loc=small.mean(), scale=scipy.stats.sem(small))
    assert (lo_s, hi_s) == pytest.approx((ref_lo, ref_hi))
    assert mean_confidence_interval(small, confidence=0.99)[2] > hi_s
    assert mean_confidence_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    single = mean_confidence_interval([1.5])
    assert single[0] == 1.5 and np.isnan(single[1]) and np.isnan(single[2])


def test_diversity() -> None:
    """Identical features -> 0, mutually orthogonal -> 1, random -> in between; scale-invariant."""
    assert diversity(np.tile([[1.0, 2.0, 3.0]], (5, 1))) == pytest.approx(0.0, abs=1e-12)
    assert diversity(np.eye(6)) == pytest.approx(1.0)
    x = np.abs(_gauss(50, seed=4))
    value = diversity(x)
    assert 0.0 < value < 1.0
    assert diversity(x * 7.0) == pytest.approx(value)
    # Brute force over all pairs agrees with the O(N D) formula.
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    brute = 1.0 - (cos.sum() - np.trace(cos)) / (50 * 49)
    assert value == pytest.approx(brute)


def test_metrics_validate_inputs() -> None:
    """Mismatched shapes and too-small sets fail with ValueError."""
    with pytest.raises(ValueError):
        frechet_distance(_gauss(10), _gauss(10, dim=8))
    with pytest.raises(ValueError):
        frechet_distance(_gauss(1), _gauss(10))
    with pytest.raises(ValueError):
        knn_caption_alignment(_gauss(3), _gauss(4), _gauss(5), _gauss(5))
    with pytest.raises(ValueError):
        knn_category_accuracy(_gauss(3), ["a"], _gauss(5), ["a"] * 5)
    with pytest.raises(ValueError):
        mean_confidence_interval([])


def test_realism_prefers_images_near_real_ones_over_noise() -> None:
    from components.evaluate.metrics import realism

    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 64)) + 3.0  # real images cluster away from the origin
    near_copies = real[:10] + 0.1 * rng.normal(size=(10, 64))
    noise = rng.normal(size=(10, 64))
    assert realism(near_copies, real).mean() > 0.95
    assert realism(noise, real).mean() < realism(near_copies, real).mean() - 0.5


def test_compare_paired_win_needs_a_higher_mean_and_reports_noise() -> None:
    """A clear per-prompt gain wins with separate intervals; a gain within the noise wins on the
    mean but is flagged (overlapping intervals); a loss or a tie is not a win."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, size=40)  # prompt difficulty, shared by both models
    clear = compare_paired(base + 0.3, base)
    assert clear["wins"] == 1.0 and clear["ci_overlap"] == 0.0 and clear["significant"] == 1.0
    assert clear["difference"] == pytest.approx(0.3)
    assert clear["difference_ci_low"] == pytest.approx(0.3) == clear["difference_ci_high"]

    # +0.02 on every prompt: far inside the spread across prompts (unpaired intervals overlap),
    # but the pairing removes the prompt difficulty, so the paired difference is significant.
    small = compare_paired(base + 0.02 + rng.normal(0, 0.005, 40), base)
    assert small["wins"] == 1.0 and small["ci_overlap"] == 1.0 and small["significant"] == 1.0

    noisy = compare_paired(base + rng.normal(0, 0.2, 40), base)
    assert noisy["difference_ci_low"] < 0 < noisy["difference_ci_high"] and noisy["significant"] == 0.0

    assert compare_paired(base, base + 0.1)["wins"] == 0.0
    assert compare_paired(base, base)["wins"] == 0.0  # a tie is not a win
    single = compare_paired([0.9], [0.1])
    assert single["wins"] == 1.0 and single["ci_overlap"] == 1.0 and single["significant"] == 0.0
    with pytest.raises(ValueError, match="same number of prompts"):
        compare_paired([1.0, 2.0], [1.0])


def test_frame_change_is_zero_for_frozen_clips_and_grows_with_motion() -> None:
    """A repeated frame scores 0; a moving gradient scores in between; fresh noise every frame ~1/3."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    frozen = np.broadcast_to(frame, (2, 5, 16, 16, 3))
    assert np.array_equal(frame_change(frozen), [0.0, 0.0])

    ramp = np.linspace(0, 255, 32).astype(np.uint8)
    moving = np.stack([np.roll(ramp, shift)[None, :16, None].repeat(16, 0).repeat(3, 2) for shift in range(5)])
    moving_change = frame_change(moving[None])[0]
    noise_change = frame_change(rng.integers(0, 256, size=(1, 5, 16, 16, 3), dtype=np.uint8))[0]
    assert 0 < moving_change < noise_change
    assert noise_change == pytest.approx(1 / 3, abs=0.02)
    # uint8 differences must not wrap: 255 -> 0 is a change of the full range, not 1 level.
    flip = np.array([[[0], [255]]], dtype=np.uint8)  # [N=1, T=2, 1]
    assert frame_change(flip)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_change(frozen[:, :1])


def test_headline_metrics_include_alignment_and_aesthetic() -> None:
    """The registry and the report compare models on both of issue 4's claims."""
    assert {"alignment", "aesthetic", "fid", "kid"} <= set(HEADLINE_METRICS)


def test_wilson_interval_matches_known_values() -> None:
    """5/10 -> [0.2366, 0.7634] (the textbook Wilson interval); 10/10 stays below 1 on the low side; n=0 is [0, 1]."""
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    z2 = scipy.stats.norm.ppf(0.975) ** 2
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(10 / (10 + z2)) and high == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0] < wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_rank_normalise_is_scale_free_and_shares_ties() -> None:
    assert rank_normalise([3.0, 1.0, 2.0]).tolist() == [1.0, 0.0, 0.5]
    assert rank_normalise([1.0, 1.0, 5.0]).tolist() == [0.25, 0.25, 1.0]
    assert rank_normalise([7.0]).tolist() == [0.5]


def test_pairwise_win_rate_on_known_inputs() -> None:
    """Dominating every prompt wins all; identical images tie (half a win each); a mixed case is judged by the
    summed rank-normalised scores, whatever each metric's units."""
    rng = np.random.default_rng(0)
    base = {"alignment": rng.uniform(0.2, 0.4, 20), "aesthetic": rng.uniform(0.4, 0.6, 20)}
    better = {k: v + 0.5 for k, v in base.items()}
    result = pairwise_win_rate(better, base)
    assert result["win_rate"] == 1.0 and result["wins"] == 20 and result["ties"] == 0 and result["n"] == 20
    assert result["ci_low"] == pytest.approx(wilson_interval(20, 20)[0]) and result["ci_high"] == pytest.approx(1.0)
    assert pairwise_win_rate(base, better)["win_rate"] == 0.0

    same = pairwise_win_rate(base, base)
    assert same["ties"] == 20 and same["win_rate"] == 0.5
    assert (same["ci_low"], same["ci_high"]) == pytest.approx(wilson_interval(10, 20))

    # Two prompts. Alignment values 1,4 (candidate) vs 2,3 -> pooled ranks 0,1 vs 1/3,2/3;
    # aesthetic 40,10 vs 20,30 (scaled by 1000 to show units do not matter) -> ranks 1,0 vs 1/3,2/3.
    # Prompt 0: candidate 0+1 = 1 vs 1/3+1/3: wins. Prompt 1: 1+0 = 1 vs 2/3+2/3: loses.
    candidate = {"alignment": [1.0, 4.0], "aesthetic": [40_000.0, 10_000.0]}
    baseline = {"alignment": [2.0, 3.0], "aesthetic": [20_000.0, 30_000.0]}
    mixed = pairwise_win_rate(candidate, baseline)
    assert (mixed["wins"], mixed["ties"], mixed["losses"], mixed["win_rate"]) == (1, 0, 1, 0.5)
    # One tie (equal judge scores) and one win: (1 + 0.5) / 2.
    tied = pairwise_win_rate({"alignment": [5.0, 2.0]}, {"alignment": [5.0, 1.0]}, metrics=("alignment",))
    assert (tied["wins"], tied["ties"], tied["win_rate"]) == (1, 1, 0.75)

    with pytest.raises(ValueError, match="aesthetic"):
        pairwise_win_rate({"alignment": [1.0]}, {"alignment": [1.0]})
    with pytest.raises(ValueError, match="same, non-zero number of prompts"):
        pairwise_win_rate({"alignment": [1.0, 2.0]}, {"alignment": [1.0]}, metrics=("alignment",))
