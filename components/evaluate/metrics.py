"""Sample-quality metrics on precomputed features: FD, KID, kNN prompt alignment, diversity, CIs.

Pure numpy/scipy on purpose: features are extracted once (``models.vision_features``)
and every metric here is then cheap, deterministic and unit-testable without torch.

Feature space caveat: the image features come from ImageNet EfficientNet-Lite0, not
InceptionV3, so :func:`frechet_distance` / :func:`kernel_inception_distance` values (reported
as ``fid`` / ``kid``: the same formulas in another feature space) are comparable only between
runs that use the same extractor, never with published Inception-FID/KID.

Pairwise A/B (:func:`pairwise_win_rate`): a judge that picks the better of two images made
from the same prompt and seed by per-prompt automatic scores, with a Wilson interval on the
win rate (:func:`wilson_interval`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import scipy.linalg
import scipy.stats
from numpy.typing import ArrayLike

__all__ = [
    "HEADLINE_METRICS",
    "caption_alignment_chance",
    "compare_paired",
    "diversity",
    "frame_change",
    "frechet_distance",
    "kernel_inception_distance",
    "knn_caption_alignment",
    "knn_category_accuracy",
    "mean_confidence_interval",
    "pairwise_win_rate",
    "rank_normalise",
    "realism",
    "wilson_interval",
]

# Relative error ||X @ X - A||_F / ||A||_F above which a sqrtm result is not trusted and
# the eps-regularised fallback is used instead.
_SQRTM_MAX_REL_ERROR = 1e-3
# Imaginary residue on the diagonal of sqrtm that is still treated as round-off.
_SQRTM_MAX_IMAG = 1e-3
# Bounds the [rows, refs] similarity block held in memory by the kNN search (~128 MiB f64).
_KNN_BLOCK_ELEMENTS = 1 << 24


# The metrics shown side by side in reports and copied onto registered model versions.
# "fid" / "kid" are Frechet / kernel distances in EfficientNet-Lite0 features (not Inception).
HEADLINE_METRICS = ("alignment", "aesthetic", "category_accuracy", "fid", "kid", "realism", "diversity", "latency_ms")
# Per-prompt scores the A/B judge combines (each rank-normalised, equal weight).
JUDGE_METRICS = ("alignment", "aesthetic")


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))``. ``sqrt(S_a S_b)`` comes from
    :func:`scipy.linalg.sqrtm`; when that is non-finite or inaccurate (singular
    covariances, e.g. fewer samples than feature dimensions) it is recomputed with
    ``eps * I`` added to both covariances. Imaginary round-off is dropped; a large
    imaginary part raises ``ValueError``. Tiny negative results from round-off are
    clipped to 0.

    Args:
        feats_a: ``[N_a, D]`` features, ``N_a >= 2``.
        feats_b: ``[N_b, D]`` features, ``N_b >= 2``.
        eps: diagonal offset for the fallback square root.
    """
    a = _as_features(feats_a, "feats_a", min_rows=2)
    b = _as_features(feats_b, "feats_b", min_rows=2)
    _check_same_dim(a, b)

    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    if min(len(a), len(b)) <= a.shape[1]:
        # Fewer samples than dimensions (the usual case for evaluation sets here): the
        # covariances are low-rank, and Tr sqrt(S_a S_b) is exactly the nuclear norm of
        # A_c B_c^T / sqrt((n_a-1)(n_b-1)) for the centred data. That is an [N_a, N_b] SVD
        # instead of a [D, D] sqrtm: milliseconds instead of seconds at D=1280, and no eps.
        centred_a, centred_b = a - mu_a, b - mu_b
        cross = centred_a @ centred_b.T / np.sqrt((len(a) - 1) * (len(b) - 1))
        trace_covmean = float(np.linalg.svd(cross, compute_uv=False).sum())
        trace_a = float((centred_a * centred_a).sum() / (len(a) - 1))
        trace_b = float((centred_b * centred_b).sum() / (len(b) - 1))
        diff = mu_a - mu_b
        return max(float(diff @ diff) + trace_a + trace_b - 2.0 * trace_covmean, 0.0)

    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))

    covmean = _sqrtm_product(cov_a, cov_b)
    if covmean is None:
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = _sqrtm_product(cov_a + offset, cov_b + offset, check_error=False)
        if covmean is None:
            raise ValueError("matrix square root of the covariance product is not finite, even with eps offset")

    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > _SQRTM_MAX_IMAG:
            raise ValueError(f"sqrtm has a significant imaginary component ({max_imag:.3g})")
        covmean = covmean.real

    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def kernel_inception_distance(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID): unbiased MMD^2 with the cubic polynomial kernel, over subsets.

    Kernel ``k(x, y) = (x . y / D + 1)^3`` (Bińkowski et al., 2018). Each of ``subsets``
    rounds draws ``min(subset_size, N_a, N_b)`` rows from each set without replacement
    and computes the unbiased MMD^2 estimate; the result is the mean and standard
    deviation over rounds. Unbiased means the value can be slightly negative when both
    sets come from the same distribution.

    Returns:
        ``(mean, std)`` of the per-subset MMD^2 estimates.
    """
    a = _as_features(feats_a, "feats_a", min_rows=2)
    b = _as_features(feats_b, "feats_b", min_rows=2)
    _check_same_dim(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")

    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        # Unbiased: the diagonal k(x_i, x_i) terms are excluded from the within-set sums.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


def knn_caption_alignment(
    gen_feats: ArrayLike,
    prompt_text_emb: ArrayLike,
    ref_feats: ArrayLike,
    ref_caption_emb: ArrayLike,
    k: int = 5,
) -> np.ndarray:
    """Per-image prompt alignment by retrieval: a CLIP-score substitute.

    No joint image-text model (CLIP) is available offline, so alignment is measured
    through a captioned reference set: for each generated image, find its ``k`` nearest
    real reference images by cosine similarity of image features, and score the mean
    cosine similarity between the prompt's text embedding and those references'
    caption embeddings. A high score means "this image looks like real images whose
    captions say what the prompt says".

    Interpretation and bounds (MiniLM all-MiniLM-L6-v2 embeddings): paraphrases score
    about 0.6-0.8 and unrelated captions about 0.1. Unrelated content (e.g. noise images)
    retrieves neighbours that have nothing to do with the prompt, so the score falls to
    the chance level ``prompt . mean(caption embeddings)`` (see
    :func:`caption_alignment_chance`), not to 0; report that floor, and the score of
    held-out real images against their own captions as the ceiling, next to the value.
    Quality depends on reference coverage: a prompt with no similar reference captions
    cannot score high even for a perfect image.

    Args:
        gen_feats: ``[N, D]`` image features of the generated images.
        prompt_text_emb: ``[N, E]`` text embedding of each image's prompt.
        ref_feats: ``[M, D]`` image features of the real reference images.
        ref_caption_emb: ``[M, E]`` caption embeddings of the reference images.
        k: neighbours per image (capped at ``M``).

    Returns:
        ``[N]`` float64 scores in ``[-1, 1]``.
    """
    gen = _as_features(gen_feats, "gen_feats")
    prompts = _as_features(prompt_text_emb, "prompt_text_emb")
    ref = _as_features(ref_feats, "ref_feats", min_rows=1)
    captions = _as_features(ref_caption_emb, "ref_caption_emb", min_rows=1)
    _check_same_dim(gen, ref, "gen_feats", "ref_feats")
    _check_same_dim(prompts, captions, "prompt_text_emb", "ref_caption_emb")
    _check_same_rows(gen, prompts, "gen_feats", "prompt_text_emb")
    _check_same_rows(ref, captions, "ref_feats", "ref_caption_emb")

    # Embeddings are documented as L2-normalised; renormalising is idempotent and keeps
    # the score a true cosine if a caller forgets.
    prompts = _l2_normalise(prompts)
    captions = _l2_normalise(captions)
    neighbours = _knn_indices(gen, ref, k)
    return np.einsum("ne,nke->n", prompts, captions[neighbours]) / neighbours.shape[1]


def caption_alignment_chance(prompt_text_emb: ArrayLike, ref_caption_emb: ArrayLike) -> np.ndarray:
    """Chance level of :func:`knn_caption_alignment`: expected score with random neighbours.

    Equals the mean cosine between each prompt and all reference captions, i.e. what an
    image carrying no prompt-relevant content (noise) is expected to score.

    Returns:
        ``[N]`` float64 chance-level scores, one per prompt.
    """
    prompts = _l2_normalise(_as_features(prompt_text_emb, "prompt_text_emb"))
    captions = _l2_normalise(_as_features(ref_caption_emb, "ref_caption_emb", min_rows=1))
    _check_same_dim(prompts, captions, "prompt_text_emb", "ref_caption_emb")
    # Mean of dot products equals the dot product with the mean caption vector.
    return prompts @ captions.mean(axis=0)


def knn_category_accuracy(
    gen_feats: ArrayLike,
    prompt_categories: Sequence[Hashable],
    ref_feats: ArrayLike,
    ref_categories: Sequence[Hashable],
    k: int = 5,
) -> float:
    """Fraction of generated images whose k-NN majority category equals the prompt's.

    Each generated image is classified by a majority vote over the categories of its
    ``k`` nearest reference images (cosine on image features). Ties go to the tied
    category whose best-ranked neighbour is nearest, so the result is deterministic.

    Args:
        gen_feats: ``[N, D]`` image features of the generated images.
        prompt_categories: ``N`` category labels the prompts asked for.
        ref_feats: ``[M, D]`` image features of the reference images.
        ref_categories: ``M`` category labels of the reference images.
        k: neighbours per image (capped at ``M``).
    """
    gen = _as_features(gen_feats, "gen_feats")
    ref = _as_features(ref_feats, "ref_feats", min_rows=1)
    _check_same_dim(gen, ref, "gen_feats", "ref_feats")
    prompt_labels = list(prompt_categories)
    ref_labels = list(ref_categories)
    if len(prompt_labels) != gen.shape[0]:
        raise ValueError(f"prompt_categories has {len(prompt_labels)} labels for {gen.shape[0]} images")
    if len(ref_labels) != ref.shape[0]:
        raise ValueError(f"ref_categories has {len(ref_labels)} labels for {ref.shape[0]} references")
    if gen.shape[0] == 0:
        raise ValueError("gen_feats is empty")

    neighbours = _knn_indices(gen, ref, k)
    correct = 0
    for row, target in zip(neighbours, prompt_labels, strict=True):
        votes = [ref_labels[j] for j in row]
        counts = Counter(votes)
        best = max(counts.values())
        # Rows are sorted nearest-first, so the first label with the top count is the
        # tied category with the nearest neighbour.
        predicted = next(label for label in votes if counts[label] == best)
        correct += int(predicted == target)
    return correct / gen.shape[0]


def mean_confidence_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of per-sample values.

    Returns:
        ``(mean, low, high)``. With a single value the interval is undefined and
        ``low``/``high`` are NaN; with zero spread they equal the mean.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("values is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain NaN or Inf")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    sem = float(x.std(ddof=1)) / np.sqrt(x.size)
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)) * sem
    return mean, mean - half, mean + half


def compare_paired(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> dict[str, float]:
    """Does model A beat model B (higher is better) on per-prompt scores of the same prompts?

    Both models answer the same prompts with the same seed, so the scores pair up by index.
    Returns floats (booleans as 0/1, so they can be logged as metrics):

    - ``wins``: 1 when ``mean(a) > mean(b)`` (ties lose).
    - ``ci_overlap``: 1 when the two means' own ``confidence`` intervals (Student-t, as in
      :func:`mean_confidence_interval`) overlap, i.e. the unpaired view cannot tell them apart.
    - ``difference``, ``difference_ci_low``, ``difference_ci_high``: mean of ``a - b`` and its
      paired t-interval, which is narrower than the unpaired one because prompt difficulty
      cancels out.
    - ``significant``: 1 when that paired interval lies entirely above 0.

    With one prompt the intervals are undefined: ``ci_overlap`` is 1 and ``significant`` 0.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same number of prompts, got {x.size} and {y.size}")
    mean_a, low_a, high_a = mean_confidence_interval(x, confidence)
    mean_b, low_b, high_b = mean_confidence_interval(y, confidence)
    difference, low, high = mean_confidence_interval(x - y, confidence)
    defined = x.size > 1
    # NaN bounds (one prompt) compare False, so they count as overlapping / not significant.
    separated = defined and (low_a > high_b or low_b > high_a)
    return {
        "wins": float(mean_a > mean_b),
        "ci_overlap": float(not separated),
        "difference": difference,
        "difference_ci_low": low,
        "difference_ci_high": high,
        "significant": float(defined and low > 0.0),
    }


def frame_change(clips: ArrayLike, value_range: float = 255.0) -> np.ndarray:
    """Per-clip mean absolute change between consecutive frames, as a fraction of `value_range`.

    ``clips`` is ``[N, T, ...]`` (e.g. uint8 ``[N, T, H, W, 3]``, ``T >= 2``). 0 means a frozen
    clip (the generator ignored time); independent noise in every frame scores about 1/3 for
    uniform values. Returns ``[N]`` float64 values in ``[0, 1]``.
    """
    x = np.asarray(clips)
    if x.ndim < 3:
        raise ValueError(f"clips must be [N, T, ...] with frame content, got shape {x.shape}")
    if x.shape[1] < 2:
        raise ValueError(f"clips need at least 2 frames to measure change, got {x.shape[1]}")
    if value_range <= 0:
        raise ValueError(f"value_range must be > 0, got {value_range}")
    x = x.astype(np.float64)  # uint8 differences would wrap around
    change = np.abs(np.diff(x, axis=1)) / value_range
    return change.reshape(x.shape[0], -1).mean(axis=1)


def diversity(feats: ArrayLike) -> float:
    """Mean pairwise cosine distance ``1 - cos`` over all distinct pairs (0 = all identical).

    Computed from the sum of normalised vectors in O(N D) rather than an N x N matrix;
    an all-zero feature vector counts as cosine 0 to everything.
    """
    x = _as_features(feats, "feats", min_rows=2)
    x = _l2_normalise(x)
    n = x.shape[0]
    total = x.sum(axis=0)
    # Sum over ordered pairs i != j of x_i . x_j = ||sum x||^2 - sum ||x_i||^2.
    off_diagonal = float(total @ total) - float(np.einsum("nd,nd->", x, x))
    return 1.0 - off_diagonal / (n * (n - 1))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (successes may be fractional).

    Better behaved than the normal approximation near 0 and 1 and for small ``n`` (it never
    leaves [0, 1]). Half-wins from ties count as 0.5 successes, the usual convention for win
    rates; the interval then treats the rate as a binomial proportion, a slight overstatement
    of its spread. ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def rank_normalise(values: ArrayLike) -> np.ndarray:
    """Ranks scaled to [0, 1] (0 = lowest, 1 = highest; ties share their average rank).

    Puts scores with different units (alignment cosines, aesthetic scores) on one scale, so a
    judge can weigh them equally; a single value maps to 0.5.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("values is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain NaN or Inf")
    if x.size == 1:
        return np.array([0.5])
    return (scipy.stats.rankdata(x, method="average") - 1.0) / (x.size - 1)


def pairwise_win_rate(candidate: dict[str, ArrayLike], baseline: dict[str, ArrayLike],
                      metrics: Sequence[str] = JUDGE_METRICS, confidence: float = 0.95,
                      tie_tolerance: float = 1e-9) -> dict[str, float]:
    """A/B win rate of `candidate` over `baseline` on the same prompts (same seed per prompt).

    The judge: for each metric (higher is better; both models' per-prompt scores in
    `candidate[m]` / `baseline[m]`, paired by index), the 2N scores are ranked together and
    scaled to [0, 1] (:func:`rank_normalise`); an image's judge score is the mean of its
    normalised ranks. Per prompt, the image with the higher judge score wins; equal scores
    (within `tie_tolerance`, e.g. identical images) are a tie and count as half a win.

    Returns floats: ``win_rate`` = (wins + ties / 2) / n, its Wilson interval ``ci_low`` /
    ``ci_high`` (:func:`wilson_interval`), ``n``, ``wins``, ``ties``, ``losses``.
    """
    if not metrics:
        raise ValueError("the judge needs at least one metric")
    judge_a = judge_b = None
    n = None
    for metric in metrics:
        if metric not in candidate or metric not in baseline:
            raise ValueError(f"judge metric {metric!r} is missing from the candidate's or the baseline's scores")
        a = np.asarray(candidate[metric], dtype=np.float64).ravel()
        b = np.asarray(baseline[metric], dtype=np.float64).ravel()
        if a.shape != b.shape or a.size == 0:
            raise ValueError(f"{metric}: paired scores need the same, non-zero number of prompts, "
                             f"got {a.size} and {b.size}")
        n = a.size
        ranks = rank_normalise(np.concatenate([a, b]))
        judge_a = ranks[:n] if judge_a is None else judge_a + ranks[:n]
        judge_b = ranks[n:] if judge_b is None else judge_b + ranks[n:]
    difference = (judge_a - judge_b) / len(metrics)
    ties = int(np.sum(np.abs(difference) <= tie_tolerance))
    wins = int(np.sum(difference > tie_tolerance))
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(wins + 0.5 * ties, n, confidence)
    return {"win_rate": float(rate), "ci_low": low, "ci_high": high, "n": float(n), "wins": float(wins),
            "ties": float(ties), "losses": float(n - wins - ties)}


def _sqrtm_product(cov_a: np.ndarray, cov_b: np.ndarray, check_error: bool = True) -> np.ndarray | None:
    """``sqrtm(cov_a @ cov_b)``, or ``None`` when it is non-finite or (optionally) inaccurate."""
    product = cov_a @ cov_b
    root = scipy.linalg.sqrtm(product)
    if not np.all(np.isfinite(root)):
        return None
    if check_error:
        scale = np.linalg.norm(product)
        if scale > 0 and np.linalg.norm(root @ root - product) / scale > _SQRTM_MAX_REL_ERROR:
            return None
    return root


def realism(gen_feats: ArrayLike, ref_feats: ArrayLike) -> np.ndarray:
    """Per-image cosine similarity to the nearest real reference image in feature space.

    A per-sample quality score in the spirit of improved precision (Kynkäänniemi et al.):
    an image that looks like *some* real image scores high, noise and mush score low. Unlike
    the technical-quality score used in curation, random noise cannot score well here (noise
    is sharp and colourful, so it wins on those). Returns ``[N]`` values in ``[-1, 1]``.
    """
    gen = _l2_normalise(_as_features(gen_feats, "gen_feats"))
    ref = _l2_normalise(_as_features(ref_feats, "ref_feats", min_rows=1))
    _check_same_dim(gen, ref, "gen_feats", "ref_feats")
    nearest = _knn_indices(gen, ref, 1)[:, 0]
    return np.einsum("nd,nd->n", gen, ref[nearest])


def _knn_indices(query: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[N, k']`` of each query's nearest references by cosine, nearest first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, ref.shape[0])
    q = _l2_normalise(query)
    r = _l2_normalise(ref)
    out = np.empty((q.shape[0], k), dtype=np.int64)
    rows = max(1, _KNN_BLOCK_ELEMENTS // r.shape[0])
    for start in range(0, q.shape[0], rows):
        sims = q[start : start + rows] @ r.T
        if k < r.shape[0]:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(r.shape[0]), sims.shape).copy()
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start : start + rows] = np.take_along_axis(top, order, axis=1)
    return out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def _as_features(x: ArrayLike, name: str, min_rows: int = 0) -> np.ndarray:
    """Coerce to a finite float64 ``[N, D]`` array with at least ``min_rows`` rows."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str = "feats_a", name_b: str = "feats_b") -> None:
    """Raise unless both arrays have the same feature width."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has dim {a.shape[1]} but {name_b} has dim {b.shape[1]}")


def _check_same_rows(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise unless both arrays describe the same number of items."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}")
