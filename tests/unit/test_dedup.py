"""Unit tests for components.curate.dedup: hashes, multi-index near-duplicate search, SemDeDup.

Every search result is checked against a brute-force all-pairs reference with the same
greedy (first occurrence wins) or connected-components policy.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.fft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from components.curate import dedup
from components.curate.dedup import (
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    SEMANTIC_DUPLICATE,
    decode_draft,
    dhash,
    dhash_batch,
    exact_duplicates,
    gray32,
    gray_thumbnail,
    hamming_distance,
    near_duplicate_groups,
    phash,
    phash_batch,
    semantic_duplicates,
)

# --------------------------------------------------------------------------- references


def _greedy_reference(close: np.ndarray) -> np.ndarray:
    """Sequential greedy on a boolean "within threshold" matrix: keep unless a kept item is close."""
    n = close.shape[0]
    representative = np.arange(n)
    kept: list[int] = []
    for i in range(n):
        for j in kept:  # ascending: the earliest kept close item wins
            if close[i, j]:
                representative[i] = j
                break
        else:
            kept.append(i)
    return representative


def _components_reference(close: np.ndarray) -> np.ndarray:
    """Earliest item of each connected component (union-find)."""
    n = close.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        """Root of ``i``'s set, with path halving."""
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(close, 1)), strict=True):
        ri, rj = find(int(i)), find(int(j))
        parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _hamming_matrix(hashes: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distances [n, n]."""
    return np.bitwise_count(hashes[:, None] ^ hashes[None, :])


def _planted_hashes(rng: np.random.Generator, n: int, max_flips: int, fraction: float = 0.3) -> np.ndarray:
    """Random 64-bit hashes where ``fraction`` of items copy an earlier/later one with a few bits flipped."""
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for _ in range(int(n * fraction)):
        src, dst = rng.integers(0, n, size=2)
        flips = rng.choice(64, size=int(rng.integers(0, max_flips + 1)), replace=False)
        hashes[dst] = hashes[src] ^ np.uint64(sum(1 << int(f) for f in flips))
    return hashes


def _synthetic_image(seed: int, size: int = 256) -> Image.Image:
    """Gradient + shapes + noise: a photo-like image whose pHash is stable but specific."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([128 + 90 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy) for _ in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32) + rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encode ``image`` as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- hashes


def test_phash_matches_the_imagehash_definition() -> None:
    """DCT-II of 32x32, 8x8 low block with DC, > median, first coefficient = most significant bit."""
    rng = np.random.default_rng(0)
    grays = rng.uniform(0, 255, size=(50, 32, 32)).round().astype(np.float32)
    grays[0] = 7.0  # constant image: only the DC bit is set
    low = scipy.fft.dctn(grays.astype(np.float64), type=2, axes=(1, 2))[:, :8, :8].reshape(50, 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    expected = [int("".join("1" if b else "0" for b in row), 2) for row in bits]
    assert phash_batch(grays).tolist() == expected
    assert int(phash(grays[0])) == 1 << 63
    assert phash(grays[3]) == phash_batch(grays)[3]


def test_phash_is_bit_compatible_with_imagehash() -> None:
    """Same 32x32 input, same 64 bits as imagehash.phash (hex string compared)."""
    import imagehash  # a test/benchmark dependency only (the baseline), not used by the library
    rng = np.random.default_rng(1)
    for _ in range(20):
        gray = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
        assert format(int(phash(gray.astype(np.float32))), "016x") == str(imagehash.phash(Image.fromarray(gray)))


def test_dhash_definition() -> None:
    """Bit 8r+c set where pixel [r, c+1] > [r, c], most significant first."""
    rng = np.random.default_rng(2)
    grays = rng.integers(0, 256, size=(10, 8, 9)).astype(np.float32)
    bits = (grays[:, :, 1:] > grays[:, :, :-1]).reshape(10, 64)
    expected = [int("".join("1" if b else "0" for b in row), 2) for row in bits]
    assert dhash_batch(grays).tolist() == expected
    assert dhash(grays[4]) == expected[4]


def test_hash_shapes_are_checked() -> None:
    """Wrong input shapes raise instead of hashing garbage."""
    with pytest.raises(ValueError):
        phash_batch(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError):
        dhash_batch(np.zeros((2, 8, 8), np.float32))


def test_phash_survives_recompression_and_resizing_and_separates_different_images() -> None:
    """Edited copies stay within 4 bits; different images are >= 12 bits apart."""
    original = _synthetic_image(0)
    reference = phash(gray32(original))
    variants = [
        Image.open(io.BytesIO(_jpeg(original, quality=60))),  # lazily opened: gray32 uses draft mode
        Image.open(io.BytesIO(_jpeg(original, quality=95))),
        original.resize((192, 192), Image.Resampling.BILINEAR),
        original.resize((400, 400), Image.Resampling.BICUBIC),
    ]
    for variant in variants:
        assert hamming_distance(reference, phash(gray32(variant))) <= 4
    others = [phash(gray32(_synthetic_image(seed))) for seed in range(1, 9)]
    assert min(int(hamming_distance(reference, other)) for other in others) >= 12
    # dHash is cheaper and rougher, but a recompressed copy is still close.
    d0 = dhash(gray_thumbnail(original, (9, 8)))
    d1 = dhash(gray_thumbnail(Image.open(io.BytesIO(_jpeg(original, quality=70))), (9, 8)))
    assert hamming_distance(d0, d1) <= 6


def test_draft_decoding_picks_the_smallest_sufficient_jpeg_scale() -> None:
    """JPEGs decode at 1/2, 1/4 or 1/8 scale, never below the requested size."""
    data = _jpeg(_synthetic_image(3, size=512))
    assert decode_draft(data, (256, 256)).size == (256, 256)  # 1/2 scale
    assert decode_draft(data, (100, 100)).size == (128, 128)  # 1/4 covers 100
    assert decode_draft(data, (300, 300)).size == (512, 512)  # no scale fits: full size
    assert decode_draft(data, (64, 64), mode="L").mode == "L"
    lazy = Image.open(io.BytesIO(data))
    gray = gray32(lazy)
    assert gray.shape == (32, 32) and gray.dtype == np.float32
    assert lazy.size == (64, 64)  # decoded at 1/8 scale, then area-reduced to 32x32
    full = gray32(Image.open(io.BytesIO(data)).convert("RGB"))  # already loaded: no draft
    assert hamming_distance(phash(gray), phash(full)) <= 4
    png = io.BytesIO()
    _synthetic_image(4).save(png, "PNG")
    assert decode_draft(png.getvalue(), (32, 32)).size == (256, 256)  # not a JPEG: full decode


# --------------------------------------------------------------------------- perceptual search


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 160), max_distance=st.integers(0, 12), seed=st.integers(0, 2**32 - 1),
       policy=st.sampled_from(["greedy", "connected"]))
def test_near_duplicates_equal_brute_force(n: int, max_distance: int, seed: int, policy: str) -> None:
    """Multi-index search + greedy/connected resolution equals the all-pairs reference."""
    rng = np.random.default_rng(seed)
    hashes = _planted_hashes(rng, n, max_flips=max_distance + 2)
    result = near_duplicate_groups(hashes, max_distance, policy=policy)  # type: ignore[arg-type]
    close = _hamming_matrix(hashes) <= max_distance
    reference = _greedy_reference(close) if policy == "greedy" else _components_reference(close)
    np.testing.assert_array_equal(result.representative, reference)
    np.testing.assert_array_equal(result.score, _hamming_matrix(hashes)[np.arange(n), reference])
    if policy == "greedy":  # kept items are pairwise farther apart than the threshold
        kept = np.flatnonzero(result.kept)
        sub = close[np.ix_(kept, kept)]
        assert not np.triu(sub, 1).any()


@pytest.mark.parametrize("max_distance", [1, 4, 8])
def test_near_duplicates_on_larger_inputs(max_distance: int) -> None:
    """Large enough that the planner chooses long bands with flip probes (radius >= 1)."""
    rng = np.random.default_rng(max_distance)
    hashes = _planted_hashes(rng, 3000, max_flips=max_distance + 1, fraction=0.2)
    close = _hamming_matrix(hashes) <= max_distance
    np.testing.assert_array_equal(near_duplicate_groups(hashes, max_distance).representative, _greedy_reference(close))
    for n in (100, 3000, 1_000_000):
        _, plan = dedup._plan_bands(n, max_distance)
        assert sum(band.width for band in plan) == 64
        assert sum(band.radius + 1 for band in plan) > max_distance  # the pigeonhole guarantee
    assert any(band.radius > 0 for band in dedup._plan_bands(1_000_000, 4)[1])


def test_large_thresholds_fall_back_to_all_pairs() -> None:
    """When no band plan beats all-pairs, the blocked all-pairs path gives the same answer."""
    rng = np.random.default_rng(4)
    hashes = _planted_hashes(rng, 300, max_flips=30)
    assert dedup._plan_bands(300, 24)[0] >= 300 * 300  # no band plan is worth it
    close = _hamming_matrix(hashes) <= 24
    np.testing.assert_array_equal(near_duplicate_groups(hashes, 24).representative, _greedy_reference(close))


@pytest.mark.parametrize("table_limit", [1 << 24, 1])  # direct-address table / searchsorted look-ups
def test_forced_band_plans_with_flip_probes(monkeypatch: pytest.MonkeyPatch, table_limit: int) -> None:
    """Radius-1 and radius-2 bands, with table and searchsorted look-ups, stay exact."""
    rng = np.random.default_rng(5)
    hashes = _planted_hashes(rng, 400, max_flips=6)
    monkeypatch.setattr(dedup, "_TABLE_LIMIT", table_limit)
    # Bands 20 + 20 + 24 bits with radii 2, 1, 0: sum(r + 1) = 6 > 5.
    bands = [dedup._Band(0, 20, 2), dedup._Band(20, 20, 1), dedup._Band(40, 24, 0)]
    monkeypatch.setattr(dedup, "_plan_bands", lambda n, d: (0.0, bands))
    close = _hamming_matrix(hashes) <= 5
    np.testing.assert_array_equal(near_duplicate_groups(hashes, 5).representative, _greedy_reference(close))


def test_long_chain_uses_the_sequential_tail_and_stays_exact() -> None:
    """Each hash one bit from the previous: greedy keeps every other item (needs > 64 rounds)."""
    bits = np.random.default_rng(6).permutation(64)
    chain = [0]
    for i in range(150):
        chain.append(chain[-1] ^ (1 << int(bits[i % 64])))
    hashes = np.array(chain, dtype=np.uint64)
    close = _hamming_matrix(hashes) <= 1
    result = near_duplicate_groups(hashes, 1)
    np.testing.assert_array_equal(result.representative, _greedy_reference(close))
    np.testing.assert_array_equal(result.kept[:6], [True, False, True, False, True, False])
    connected = near_duplicate_groups(hashes, 1, policy="connected")
    assert (connected.representative == 0).all()  # the chain is one component
    assert connected.score.max() > 1  # and the distance reported is the real one, not 1


def test_first_occurrence_wins_and_repeats_point_at_it() -> None:
    """Stable order: the first item of a group is kept and named in the reject rows."""
    base = np.uint64(0x0123_4567_89AB_CDEF)
    hashes = np.array([0xFFFF_0000_FFFF_0000, base ^ np.uint64(0b11), base, base, base ^ np.uint64(0b11),
                       0xFFFF_0000_FFFF_0000], dtype=np.uint64)
    result = near_duplicate_groups(hashes, 2)
    assert result.representative.tolist() == [0, 1, 1, 1, 1, 0]
    assert result.score.tolist() == [0, 0, 2, 2, 0, 0]
    assert result.reason == NEAR_DUPLICATE
    # Reversing the order reverses who is kept: always the first occurrence.
    reversed_result = near_duplicate_groups(hashes[::-1].copy(), 2)
    assert reversed_result.representative.tolist() == [0, 1, 1, 1, 1, 0]
    records = result.records(ids=["a", "b", "c", "d", "e", "f"])
    assert records[0] == {"id": "c", "reason": "near_duplicate", "duplicate_of": "b", "distance": 2}
    assert [r["id"] for r in records] == ["c", "d", "e", "f"]


def test_duplicate_of_a_dropped_duplicate_is_kept_by_greedy() -> None:
    """Greedy does not chain (A~B, B~C, A far from C keeps C); connected does."""
    a = np.uint64(0)
    b = np.uint64(0b111)  # 3 from a
    c = np.uint64(0b111111)  # 3 from b, 6 from a
    result = near_duplicate_groups(np.array([a, b, c], dtype=np.uint64), 4)
    assert result.representative.tolist() == [0, 0, 2]
    connected = near_duplicate_groups(np.array([a, b, c], dtype=np.uint64), 4, policy="connected")
    assert connected.representative.tolist() == [0, 0, 0]
    assert connected.score.tolist() == [0, 3, 6]


def test_perceptual_edge_cases() -> None:
    """Empty, single, everything-matches and exact-only inputs; bad arguments raise."""
    empty = near_duplicate_groups(np.zeros(0, dtype=np.uint64), 4)
    assert len(empty) == 0 and empty.records() == []
    single = near_duplicate_groups(np.array([42], dtype=np.uint64), 4)
    assert single.representative.tolist() == [0] and single.kept.tolist() == [True]
    everything = near_duplicate_groups(np.array([0, 2**64 - 1, 5], dtype=np.uint64), 64)
    assert everything.representative.tolist() == [0, 0, 0]
    assert near_duplicate_groups([1, 1, 3], 0).representative.tolist() == [0, 0, 2]
    with pytest.raises(ValueError):
        near_duplicate_groups(np.array([1], dtype=np.uint64), -1)
    with pytest.raises(ValueError):
        near_duplicate_groups(np.array([1, 2], dtype=np.uint64), 1, policy="transitive")  # type: ignore[arg-type]


def test_thread_count_does_not_change_results() -> None:
    """One or two worker threads give identical results."""
    rng = np.random.default_rng(8)
    hashes = _planted_hashes(rng, 5000, max_flips=5)
    one = near_duplicate_groups(hashes, 4, workers=1)
    two = near_duplicate_groups(hashes, 4, workers=2)
    np.testing.assert_array_equal(one.representative, two.representative)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x[1500:] = x[:1500] + 0.05 * rng.standard_normal((1500, 16)).astype(np.float32)
    s1 = semantic_duplicates(x, 0.95, n_clusters=100, workers=1)
    s2 = semantic_duplicates(x, 0.95, n_clusters=100, workers=2)
    np.testing.assert_array_equal(s1.representative, s2.representative)


# --------------------------------------------------------------------------- exact


def test_exact_duplicates_first_occurrence_wins() -> None:
    """Equal digests point at their first occurrence."""
    result = exact_duplicates(["aa", "bb", "aa", "cc", "bb", "aa"])
    assert result.representative.tolist() == [0, 1, 0, 3, 1, 0]
    assert result.reason == EXACT_DUPLICATE
    assert exact_duplicates([b"\x00" * 32, b"\x00" * 32]).representative.tolist() == [0, 0]
    assert len(exact_duplicates([])) == 0


# --------------------------------------------------------------------------- semantic


def _cosine_reference(x: np.ndarray, threshold: float) -> np.ndarray:
    """All-pairs cosine > threshold matrix."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T > threshold


def _clustered(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Points around 8 random centres: realistic, clustered embeddings."""
    centres = rng.standard_normal((8, dim))
    return (centres[rng.integers(0, 8, n)] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 400), dim=st.sampled_from([4, 16, 64]), threshold=st.sampled_from([0.9, 0.97]),
       n_clusters=st.sampled_from([1, 5, 80]), seed=st.integers(0, 2**32 - 1))
def test_semantic_exact_mode_equals_all_pairs(n: int, dim: int, threshold: float, n_clusters: int, seed: int) -> None:
    """With spill=1 no pair above the threshold is lost to a cluster boundary (80 -> two levels)."""
    x = _clustered(np.random.default_rng(seed), n, dim)
    result = semantic_duplicates(x, threshold, n_clusters=n_clusters, seed=seed % 7, spill=1.0)
    np.testing.assert_array_equal(result.representative, _greedy_reference(_cosine_reference(x, threshold)))


def test_semantic_finds_planted_near_copies() -> None:
    """Isotropic 64-d data (no cluster structure: the hard case) with 1% planted copies at cos 0.96-0.995."""
    rng = np.random.default_rng(9)
    n, dim = 20_000, 64
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    src, dst = perm[:200], perm[200:400]
    cos = rng.uniform(0.96, 0.995, 200).astype(np.float32)
    noise = rng.standard_normal((200, dim)).astype(np.float32)
    noise -= (noise * x[src]).sum(1, keepdims=True) * x[src]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = cos[:, None] * x[src] + np.sqrt(1 - cos**2)[:, None] * noise
    result = semantic_duplicates(x, 0.95)
    later, earlier = np.maximum(src, dst), np.minimum(src, dst)
    found = ~result.kept[later]
    assert found.mean() >= 0.98
    np.testing.assert_array_equal(result.representative[later[found]], earlier[found])
    np.testing.assert_allclose(result.score[later[found]], cos[found], atol=1e-4)
    assert (~result.kept).sum() == found.sum()  # nothing else is a duplicate of anything
    plain = semantic_duplicates(x, 0.95, spill=0.0)  # plain SemDeDup loses boundary pairs
    assert (~plain.kept[later]).mean() < found.mean()


def test_semantic_connected_policy_and_records() -> None:
    """A chain of similar vectors under both policies, and the reject rows."""
    e = np.array([[1, 0, 0], [0.99, 0.141, 0], [0.96, 0.28, 0], [0, 0, 1]], dtype=np.float32)
    greedy = semantic_duplicates(e, 0.985, n_clusters=1)
    assert greedy.representative.tolist() == [0, 0, 2, 3]  # item 2 is close to 1 only, and 1 is dropped
    connected = semantic_duplicates(e, 0.985, n_clusters=1, policy="connected")
    assert connected.representative.tolist() == [0, 0, 0, 3]
    assert connected.score[2] == pytest.approx(0.96 / np.linalg.norm(e[2]), abs=1e-5)
    rows = greedy.records(ids=["w", "x", "y", "z"])
    assert rows == [{"id": "x", "reason": SEMANTIC_DUPLICATE, "duplicate_of": "w",
                     "similarity": pytest.approx(0.99 / np.linalg.norm(e[1]), abs=1e-5)}]


def test_semantic_edge_cases() -> None:
    """Empty, single, zero and rescaled vectors; bad shapes raise."""
    assert len(semantic_duplicates(np.zeros((0, 8), np.float32), 0.9)) == 0
    assert semantic_duplicates(np.ones((1, 8), np.float32), 0.9).representative.tolist() == [0]
    zeros_and_copies = np.array([[0, 0], [0, 0], [3, 4], [6, 8]], dtype=np.float32)  # scale is ignored
    result = semantic_duplicates(zeros_and_copies, 0.99)
    assert result.representative.tolist() == [0, 1, 2, 2]
    assert result.score.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        semantic_duplicates(np.ones(5, np.float32), 0.9)


def test_dedup_details_name_the_kept_copy_of_each_dropped_row_when_quality_order_differs_from_row_order():
    """Regression: details were written in quality order onto rows in row order, naming the wrong kept sample."""
    import pandas as pd

    from components.curate.dedup import exact_duplicates
    from components.curate.merge import _drop_duplicates
    from components.media import RejectReason

    rows = pd.DataFrame({"id": ["a", "b", "c", "d"], "status": "ok", "reason": "", "detail": "",
                         "key": ["x", "y", "x", "y"]})
    order = pd.Index([3, 1, 2, 0])  # best quality first: d, b, c, a
    groups = exact_duplicates(rows.loc[order, "key"].to_numpy())
    _drop_duplicates(rows, order, groups, RejectReason.EXACT_DUPLICATE, lambda score, kept: f"same as {kept}")
    assert rows.set_index("id")["detail"].to_dict() == {"a": "same as kept sample c", "b": "same as kept sample d",
                                                        "c": "", "d": ""}
    assert list(rows["status"]) == ["rejected", "rejected", "ok", "ok"]
