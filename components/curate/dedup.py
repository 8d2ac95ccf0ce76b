"""Deduplication at three levels: exact (sha256), perceptual (pHash / dHash), semantic (SemDeDup).

Every function takes the *global* list of items (concatenate the hashes / embeddings of
all shards in one deterministic order, e.g. ingest order) and returns a :class:`Duplicates`
with, for each item, the index of the kept item it duplicates (itself when kept) and the
distance / cosine similarity to it, so curation can write ``near_duplicate`` /
``semantic_duplicate`` reject rows naming the kept sample. One million 64-bit hashes are
8 MB and one million 64-d float32 embeddings 256 MB, so a global pass fits one process.

Policy ("greedy", the default everywhere): walk the items in order; an item is kept unless
an already *kept* item is within the threshold, in which case it is dropped and points at
the earliest such kept item. So the first occurrence always wins, kept items are pairwise
farther apart than the threshold, and a duplicate of a *dropped* duplicate is kept when it
is beyond the threshold of every kept item (no chaining: A~B and B~C with A and C far apart
keeps A and C). ``policy="connected"`` instead drops whole connected components of the
"within threshold" graph down to their earliest item (transitive; chains can merge
unrelated images), reporting the actual distance / similarity to that item.

Perceptual search is multi-index hashing (not all-pairs): the 64 bits are cut into bands;
by the pigeonhole principle two hashes within Hamming distance ``d`` agree in at least one
band up to a small per-band radius, so only items sharing a band bucket (or a bucket a few
bit flips away) are compared. Semantic search is SemDeDup's k-means clustering (two-level
for large inputs, so assignment is not N x clusters) with pairwise cosine inside each
cluster, plus "spilling" of points that lie near a cluster boundary into the neighbouring
cluster so near-duplicates split by a boundary are still found.

Nothing here imports kfp or mlflow; only numpy, scipy and Pillow (threadpoolctl if present).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from numpy.typing import NDArray
from PIL import Image

__all__ = [
    "EXACT_DUPLICATE",
    "NEAR_DUPLICATE",
    "SEMANTIC_DUPLICATE",
    "Duplicates",
    "decode_draft",
    "dhash",
    "dhash_batch",
    "exact_duplicates",
    "gray32",
    "gray_thumbnail",
    "hamming_distance",
    "near_duplicate_groups",
    "phash",
    "phash_batch",
    "semantic_duplicates",
]

# Reject reason codes. The first matches components.media.RejectReason.EXACT_DUPLICATE; the
# other two are meant to become RejectReason members with the same values (a storage format).
EXACT_DUPLICATE: Final = "exact_duplicate"
NEAR_DUPLICATE: Final = "near_duplicate"
SEMANTIC_DUPLICATE: Final = "semantic_duplicate"

Policy = Literal["greedy", "connected"]
ImageSource = str | Path | bytes | IO[bytes]

HASH_GRID: Final = 32  # pHash input side: 4x the 8x8 hash, as in imagehash / hackerfactor
HASH_BITS: Final = 64


# --------------------------------------------------------------------------- result type


@dataclass(frozen=True)
class Duplicates:
    """Result of one dedup level: who is kept, and what every dropped item duplicates.

    ``representative[i] == i`` for a kept item, otherwise the index of the kept item it
    duplicates. ``score[i]`` is the Hamming distance (``score_name == "distance"``) or the
    cosine similarity (``"similarity"``) between item ``i`` and its representative (0 or
    1.0 for kept items).
    """

    representative: NDArray[np.int64]
    score: NDArray[Any]
    reason: str
    score_name: str

    def __len__(self) -> int:
        """Number of items (kept and dropped)."""
        return int(self.representative.shape[0])

    @property
    def kept(self) -> NDArray[np.bool_]:
        """Boolean mask of the items to keep."""
        return self.representative == np.arange(len(self), dtype=np.int64)

    @property
    def duplicate_indices(self) -> NDArray[np.int64]:
        """Indices of the dropped items, ascending."""
        return np.flatnonzero(~self.kept).astype(np.int64)

    def records(self, ids: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """One reject row per dropped item: id, reason code, kept id and distance/similarity.

        ``ids`` maps item index to sample id (defaults to the index itself).
        """
        rows = []
        for i in self.duplicate_indices.tolist():
            rep = int(self.representative[i])
            rows.append({
                "id": ids[i] if ids is not None else i,
                "reason": self.reason,
                "duplicate_of": ids[rep] if ids is not None else rep,
                self.score_name: self.score[i].item(),
            })
        return rows


# --------------------------------------------------------------------------- image -> hash input


def decode_draft(source: ImageSource, min_size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Open and decode an image at the smallest JPEG scale that still covers ``min_size``.

    For JPEGs this uses Pillow's ``draft()``: libjpeg decodes at 1/2, 1/4 or 1/8 scale
    directly in the DCT domain (and, for ``mode="L"``, skips the colour planes), which is
    most of the decode + resize cost saved. The result is at least ``min_size`` (width,
    height) on both sides but not resized to it exactly; other formats decode at full size.
    Untrusted files should have passed ``components.media.decode_image``'s checks first
    (this function only relies on Pillow's own decompression-bomb limit).
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    image = Image.open(source)
    # draft() is a no-op (returns None) for non-JPEGs; the size it picks is >= the request.
    image.draft(mode, min_size)
    image.load()
    return image if image.mode == mode else image.convert(mode)


def gray_thumbnail(image: Image.Image, size: tuple[int, int]) -> NDArray[np.float32]:
    """Greyscale ``size`` (width, height) thumbnail as float32 [height, width], area-averaged.

    If ``image`` is a JPEG that has not been loaded yet, it is decoded in draft mode at the
    smallest scale >= ``size`` (this mutates ``image``: it stays at the reduced size).
    Aspect ratio is not kept (the image is squashed), as in every pHash / dHash definition.
    The final reduction is a box (area) filter: after draft decoding the remaining factor is
    small, and area averaging is the anti-aliased downsample pHash assumes.
    """
    image.draft("L", size)  # no-op unless an unloaded JPEG
    gray = image if image.mode == "L" else image.convert("L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.BOX)
    return np.asarray(gray, dtype=np.float32)


def gray32(image: Image.Image) -> NDArray[np.float32]:
    """The 32x32 greyscale float32 input of :func:`phash` (see :func:`gray_thumbnail`)."""
    return gray_thumbnail(image, (HASH_GRID, HASH_GRID))


def _dct_basis(n_out: int, n_in: int) -> NDArray[np.float64]:
    """Rows k < n_out of the unnormalised DCT-II matrix: 2 cos(pi k (2n+1) / (2 n_in))."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * n_in))


_DCT8x32: Final = _dct_basis(8, HASH_GRID)
_BATCH: Final = 8192  # images per block: bounds the float64 temporaries to ~70 MB


def _pack_bits(bits: NDArray[np.bool_]) -> NDArray[np.uint64]:
    """Pack [N, 64] booleans to uint64, first bit = most significant (imagehash's hex order)."""
    packed = np.packbits(bits.reshape(bits.shape[0], HASH_BITS), axis=1)  # big-endian bytes
    return packed.view(">u8").ravel().astype(np.uint64)


def phash_batch(grays: NDArray[np.floating[Any]]) -> NDArray[np.uint64]:
    """Perceptual hashes of a batch of 32x32 greyscale images ([N, 32, 32]) as uint64.

    Definition (imagehash.phash, after hackerfactor's "Looks Like It"): take the 2-D DCT-II
    of the 32x32 image, keep the 8x8 block of lowest frequencies (top-left, *including* the
    DC row and column), and set bit ``8*r + c`` (most significant first) where coefficient
    ``[r, c]`` is above the median of the 64. The DC coefficient is always above the median,
    so 63 bits carry information; the original phash.org library drops row and column 0
    instead, but this variant is bit-compatible with imagehash, whose hashes are common in
    existing datasets: ``format(h, "016x") == str(imagehash.phash(...))`` for the same input.
    Only those 64 coefficients are computed, as two small matrix products with the
    truncated DCT-II basis (identical to ``scipy.fft.dctn(type=2)[:8, :8]``, ~5x cheaper
    than the full transform), in float64 so median ties match imagehash's float64 DCT.
    Coefficients below 1e-9 of the largest are treated as exactly zero (rounding noise).
    """
    grays = np.asarray(grays)
    if grays.ndim != 3 or grays.shape[1:] != (HASH_GRID, HASH_GRID):
        raise ValueError(f"expected [N, {HASH_GRID}, {HASH_GRID}] images, got shape {grays.shape}")
    out = np.empty(grays.shape[0], dtype=np.uint64)
    for start in range(0, grays.shape[0], _BATCH):
        block = grays[start:start + _BATCH].astype(np.float64)
        low = (_DCT8x32 @ block @ _DCT8x32.T).reshape(-1, HASH_BITS)  # [n, 8, 8] -> [n, 64]
        # Snap rounding noise on coefficients that are zero in exact arithmetic (blank or
        # symmetric images) to zero, so e.g. every solid-colour frame hashes to 0x8000...0.
        scale = np.abs(low).max(axis=1, keepdims=True)
        low[np.abs(low) <= 1e-9 * scale] = 0.0
        median = np.median(low, axis=1, keepdims=True)
        out[start:start + _BATCH] = _pack_bits(low > median)
    return out


def phash(gray: NDArray[np.floating[Any]]) -> np.uint64:
    """Perceptual hash of one 32x32 greyscale image (see :func:`phash_batch`)."""
    return phash_batch(np.asarray(gray)[None])[0]


def dhash_batch(grays: NDArray[np.floating[Any]]) -> NDArray[np.uint64]:
    """Difference hashes of a batch of 8-row x 9-column greyscale images ([N, 8, 9]).

    Bit ``8*r + c`` (most significant first) is set where pixel ``[r, c + 1]`` is brighter
    than ``[r, c]`` (imagehash.dhash's definition and bit order). Cheaper and less robust
    than pHash; get the input with ``gray_thumbnail(image, (9, 8))``.
    """
    grays = np.asarray(grays)
    if grays.ndim != 3 or grays.shape[1:] != (8, 9):
        raise ValueError(f"expected [N, 8, 9] images, got shape {grays.shape}")
    return _pack_bits(grays[:, :, 1:] > grays[:, :, :-1])


def dhash(gray: NDArray[np.floating[Any]]) -> np.uint64:
    """Difference hash of one 8x9 greyscale image (see :func:`dhash_batch`)."""
    return dhash_batch(np.asarray(gray)[None])[0]


def hamming_distance(a: NDArray[np.uint64] | np.uint64, b: NDArray[np.uint64] | np.uint64) -> NDArray[np.uint8]:
    """Element-wise Hamming distance between 64-bit hashes (popcount of the XOR)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# --------------------------------------------------------------------------- exact


def exact_duplicates(digests: Sequence[str] | Sequence[bytes] | NDArray[Any]) -> Duplicates:
    """Exact duplicates by content digest (e.g. sha256 of the file bytes): first occurrence wins."""
    keys = np.asarray(digests)
    if keys.shape[0] == 0:
        return Duplicates(np.zeros(0, np.int64), np.zeros(0, np.int32), EXACT_DUPLICATE, "distance")
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    representative = first[inverse.ravel()].astype(np.int64)
    return Duplicates(representative, np.zeros(keys.shape[0], np.int32), EXACT_DUPLICATE, "distance")


# --------------------------------------------------------------------------- threads


def _blas_single_thread() -> contextlib.AbstractContextManager[Any]:
    """Keep BLAS to one thread while we parallelise over clusters ourselves.

    The per-cluster products are small; a multi-threaded BLAS on them spins and, on a
    shared machine where another process holds a core, runs 10-30x slower than one thread.
    threadpoolctl is optional (it ships with scikit-learn); without it BLAS is left alone.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _default_workers() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _parallel_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(t) for t in tasks]`` on ``workers`` threads (numpy and BLAS release the GIL)."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, tasks))


def _balanced_chunks(weights: NDArray[np.float64], n_chunks: int) -> list[tuple[int, int]]:
    """Cut ``range(len(weights))`` into about ``n_chunks`` contiguous runs of similar total weight."""
    if weights.size == 0:
        return []
    cumulative = np.cumsum(weights)
    cuts = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, n_chunks) / n_chunks, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [weights.size]]))
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds.tolist()) if hi > lo]


# --------------------------------------------------------------------------- resolving pairs


_MAX_ROUNDS: Final = 64
_UNKNOWN, _KEPT, _DROPPED = 0, 1, 2  # item states while resolving


def _greedy(n: int, a: NDArray[np.int64], b: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Greedy first-wins resolution of duplicate pairs ``a[e] < b[e]`` over items ``0..n-1``.

    Returns (representative per item, index of the edge to it or -1 when kept). Exact
    sequential semantics (item kept iff no earlier *kept* neighbour), computed in rounds:
    an item whose earlier neighbours include a kept one is dropped; one whose earlier
    neighbours are all dropped is kept. The earliest undecided item always decides, and
    near-duplicate groups are shallow, so a handful of vectorised rounds suffice; only an
    adversarial chain longer than 64 falls back to a loop over its remaining items (the
    lexicographically-first independent set is inherently sequential).
    """
    representative = np.arange(n, dtype=np.int64)
    edge_of = np.full(n, -1, dtype=np.int64)
    if a.size == 0:
        return representative, edge_of
    # Work on the items that have an edge only, relabelled 0..m-1 in the same order.
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    la, lb = inverse[: a.size], inverse[a.size:]
    m = nodes.size
    status = np.full(m, _KEPT, dtype=np.int8)
    status[lb] = _UNKNOWN  # only items with an earlier neighbour can be dropped
    live = np.arange(a.size)
    for _ in range(_MAX_ROUNDS):
        live = live[status[lb[live]] == _UNKNOWN]
        if live.size == 0:
            break
        sa, targets = status[la[live]], lb[live]
        drop = np.zeros(m, dtype=bool)
        drop[targets[sa == _KEPT]] = True
        blocked = np.zeros(m, dtype=bool)  # has an earlier neighbour not (yet) known dropped
        blocked[targets[sa != _DROPPED]] = True
        undecided = np.zeros(m, dtype=bool)
        undecided[targets] = True
        status[drop] = _DROPPED
        status[undecided & ~blocked] = _KEPT
    else:
        live = live[status[lb[live]] == _UNKNOWN]
        if live.size:
            _greedy_sequential(status, la[live], lb[live], la, lb)
    # Representative = earliest kept earlier neighbour; edges sorted by (b, a), first kept a per b.
    chosen = np.flatnonzero((status[la] == _KEPT) & (status[lb] == _DROPPED))
    chosen = chosen[np.lexsort((la[chosen], lb[chosen]))]
    _, first = np.unique(lb[chosen], return_index=True)
    chosen = chosen[first]
    representative[nodes[lb[chosen]]] = nodes[la[chosen]]
    edge_of[nodes[lb[chosen]]] = chosen
    return representative, edge_of


def _greedy_sequential(
    status: NDArray[np.int8], la_live: NDArray[np.int64], lb_live: NDArray[np.int64],
    la: NDArray[np.int64], lb: NDArray[np.int64],
) -> None:
    """Finish :func:`_greedy` item by item for the (rare) undecided tail of a long chain."""
    order = np.argsort(lb_live, kind="stable")
    targets, sources = lb_live[order], la_live[order]
    starts = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
    ends = np.r_[starts[1:], targets.size]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        # Sources are earlier than the target, and targets are visited in order, so decided.
        status[targets[s]] = _DROPPED if np.any(status[sources[s:e]] == _KEPT) else _KEPT


def _connected(n: int, a: NDArray[np.int64], b: NDArray[np.int64]) -> NDArray[np.int64]:
    """Representative = earliest item of each connected component of the pair graph."""
    if a.size == 0:
        return np.arange(n, dtype=np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    earliest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(earliest, labels, np.arange(n, dtype=np.int64))
    return earliest[labels]


# --------------------------------------------------------------------------- perceptual


@dataclass(frozen=True)
class _Band:
    """One band of the multi-index: bits [shift, shift + width), searched up to ``radius``."""

    shift: int
    width: int
    radius: int


_TABLE_LIMIT: Final = 1 << 24  # direct-address a band's buckets when 2**width is at most this (64 MB)
_PAIR_CHUNK: Final = 1 << 22  # candidate pairs expanded and verified at a time (bounds memory)


def _probes(width: int, radius: int) -> int:
    """Number of bucket look-ups per item for a band: all flip masks of <= radius bits."""
    return sum(math.comb(width, k) for k in range(radius + 1))


def _band_cost(n: int, width: int, radius: int) -> float:
    """Rough cost of one band: per-item look-ups plus expected random candidate pairs."""
    lookup = 1.0 if (1 << width) <= _TABLE_LIMIT else 8.0  # table gather vs searchsorted
    probes = _probes(width, radius)
    return probes * (n * lookup + 2.0 * n * n / 2.0 ** (width + 1))


def _plan_bands(n: int, max_distance: int, bits: int = HASH_BITS) -> tuple[float, list[_Band]]:
    """Choose bands and per-band radii for multi-index hashing of ``n`` hashes.

    Generalised pigeonhole: if band i is searched up to radius r_i and sum(r_i + 1) >
    max_distance, any pair within ``max_distance`` is within r_i in some band (the band
    distances sum to at most ``max_distance``). Short bands (many, radius 0: the classic
    d + 1 exact bands) make huge buckets when n is large; long bands need many flip probes.
    This picks the number of bands and their widths minimising :func:`_band_cost`: for 1M
    random hashes at d=4 that is 22+23+19 bits with radii 1, 1, 0 (~48 look-ups per item,
    ~5M candidate pairs) instead of 5 exact 13-bit bands (~600M candidate pairs). Returns
    (estimated cost, bands).
    """
    best: tuple[float, list[_Band]] | None = None
    for m in range(1, min(max_distance + 1, bits) + 1):
        q, r = divmod(max_distance + 1 - m, m)
        radii = [q + 1] * r + [q] * (m - r)
        widths = [bits // m + (1 if i < bits % m else 0) for i in range(m)]

        def cost(ws: list[int], radii: list[int] = radii) -> float:
            """Total cost of a width assignment."""
            return sum(_band_cost(n, w, rad) for w, rad in zip(ws, radii, strict=True))

        # Hill-climb the widths one bit at a time (m <= 65 bands, converges in a few passes).
        current = cost(widths)
        improved = True
        while improved:
            improved = False
            for i, j in itertools.permutations(range(m), 2):
                if widths[j] <= 1:
                    continue
                trial = list(widths)
                trial[i] += 1
                trial[j] -= 1
                c = cost(trial)
                if c < current:
                    widths, current, improved = trial, c, True
        if best is None or current < best[0]:
            shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
            best = (current, [_Band(int(s), w, rad) for s, w, rad in zip(shifts, widths, radii, strict=True)])
    assert best is not None
    return best


def _flip_masks(width: int, radius: int) -> list[int]:
    """All non-zero masks of at most ``radius`` bits within a ``width``-bit key."""
    masks = []
    for k in range(1, radius + 1):
        for combo in itertools.combinations(range(width), k):
            masks.append(sum(1 << bit for bit in combo))
    return masks


def _expand_and_verify(
    query: NDArray[np.int64], start: NDArray[np.int64], count: NDArray[np.int64],
    order: NDArray[np.int64], hashes: NDArray[np.uint64], max_distance: int,
    out: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]],
) -> None:
    """Pair each ``query[k]`` with ``order[start[k] : start[k] + count[k]]``; keep pairs within distance.

    Expansion is vectorised (repeat + offsets) in chunks of ~4M candidate pairs, so memory
    stays bounded even if a band has a large bucket.
    """
    keep = count > 0
    query, start, count = query[keep], start[keep], count[keep]
    if query.size == 0:
        return
    cumulative = np.cumsum(count)
    cuts = np.searchsorted(cumulative, np.arange(_PAIR_CHUNK, int(cumulative[-1]), _PAIR_CHUNK), side="right")
    for lo, hi in itertools.pairwise([0, *cuts.tolist(), query.size]):
        if lo == hi:
            continue
        q, s, c = query[lo:hi], start[lo:hi], count[lo:hi]
        total = int(c.sum())
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
        left = np.repeat(q, c)
        right = order[np.repeat(s, c) + offsets]
        distance = np.bitwise_count(hashes[left] ^ hashes[right])
        hit = distance <= max_distance
        if hit.any():
            left, right = left[hit], right[hit]
            out.append((np.minimum(left, right), np.maximum(left, right), distance[hit]))


@dataclass(frozen=True)
class _BandIndex:
    """One band's buckets: items sorted by band key, bucket starts/counts, key -> bucket look-up."""

    band: _Band
    key: NDArray[Any]  # band key per item (uint32 when the band fits)
    order: NDArray[np.int64]  # items sorted by key
    starts: NDArray[np.int64]  # bucket b is order[starts[b] : starts[b] + counts[b]]
    counts: NDArray[np.int64]
    bucket_keys: NDArray[Any]  # sorted distinct keys
    position: NDArray[np.int64]  # item -> its index in ``order``
    bucket: NDArray[np.int64]  # item -> its bucket
    table: NDArray[np.int32] | None  # key -> bucket or -1, when 2**width is small enough


def _band_index(hashes: NDArray[np.uint64], band: _Band) -> _BandIndex:
    """Bucket ``hashes`` by one band's bits."""
    n = hashes.size
    # Keys of <= 32 bits as uint32: half the memory traffic of every pass over them.
    key_type = np.uint32 if band.width <= 32 else np.uint64
    key = ((hashes >> np.uint64(band.shift)) & np.uint64((1 << band.width) - 1)).astype(key_type)
    order = np.argsort(key).astype(np.int64)  # order inside a bucket is irrelevant
    sorted_key = key[order]
    new_bucket = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
    starts = np.flatnonzero(new_bucket)
    counts = np.diff(np.r_[starts, n])
    bucket_keys = sorted_key[starts]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n, dtype=np.int64)
    bucket = np.empty(n, dtype=np.int64)
    bucket[order] = np.cumsum(new_bucket) - 1
    table = None
    if band.radius > 0 and (1 << band.width) <= _TABLE_LIMIT:
        table = np.full(1 << band.width, -1, dtype=np.int32)
        table[bucket_keys] = np.arange(starts.size, dtype=np.int32)
    return _BandIndex(band, key, order, starts, counts, bucket_keys, position, bucket, table)


def _probe(index: _BandIndex, flips: Sequence[int], hashes: NDArray[np.uint64], max_distance: int,
           ) -> list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]]:
    """Verified pairs from probing each item's band key XOR each of ``flips`` (0 = own bucket)."""
    found: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]] = []
    key = index.key
    for flip in flips:
        if flip == 0:
            # Own bucket: pair each item with the later members of its bucket (each pair once).
            later = index.starts[index.bucket] + index.counts[index.bucket] - index.position - 1
            _expand_and_verify(np.arange(key.size, dtype=np.int64), index.position + 1, later,
                               index.order, hashes, max_distance, found)
            continue
        # Probe only upwards (target > key) so each unordered bucket pair is visited once.
        target = key ^ key.dtype.type(flip)
        query = np.flatnonzero(target > key)
        target = target[query]
        if index.table is not None:
            hit_bucket = index.table[target].astype(np.int64)
        else:
            where = np.minimum(np.searchsorted(index.bucket_keys, target), index.bucket_keys.size - 1)
            hit_bucket = np.where(index.bucket_keys[where] == target, where, -1)
        hit = hit_bucket >= 0
        query, hit_bucket = query[hit], hit_bucket[hit]
        _expand_and_verify(query, index.starts[hit_bucket], index.counts[hit_bucket], index.order,
                           hashes, max_distance, found)
    return found


_FLIPS_PER_TASK: Final = 8


def _all_pairs(hashes: NDArray[np.uint64], max_distance: int,
               ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]:
    """All pairs (i < j) within ``max_distance`` by blocked all-pairs popcount (quadratic)."""
    found: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]] = []
    block = max(1, _PAIR_CHUNK // max(1, hashes.size))  # rows per block: ~4M distances at a time
    for lo in range(0, hashes.size, block):
        distance = np.bitwise_count(hashes[lo:lo + block, None] ^ hashes[None, lo:])
        r, c = np.divmod(np.flatnonzero(distance <= max_distance), distance.shape[1])
        keep = c > r  # columns start at lo: strictly after the row
        r, c = r[keep], c[keep]
        found.append((r + lo, c + lo, distance[r, c]))
    left = np.concatenate([f[0] for f in found]).astype(np.int64)
    right = np.concatenate([f[1] for f in found]).astype(np.int64)
    return left, right, np.concatenate([f[2] for f in found])


def _near_pairs(hashes: NDArray[np.uint64], max_distance: int, workers: int,
                ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint8]]:
    """All pairs (i < j) of distinct hashes within ``max_distance``, by multi-index hashing."""
    n = hashes.size
    cost, bands = _plan_bands(n, max_distance)
    if cost >= float(n) * n:
        # Large thresholds (or tiny inputs): no band plan beats comparing every pair.
        return _all_pairs(hashes, max_distance)
    indexes = _parallel_map(lambda band: _band_index(hashes, band), bands, workers)
    # Probe tasks of a few flip masks each, so the threads stay busy whatever the band plan.
    tasks = [(index, flips[i:i + _FLIPS_PER_TASK]) for index in indexes
             for flips in [[0, *_flip_masks(index.band.width, index.band.radius)]]
             for i in range(0, len(flips), _FLIPS_PER_TASK)]
    found = [f for part in _parallel_map(lambda t: _probe(t[0], t[1], hashes, max_distance), tasks, workers)
             for f in part]
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    left = np.concatenate([f[0] for f in found])
    right = np.concatenate([f[1] for f in found])
    distance = np.concatenate([f[2] for f in found])
    # A pair close in several bands is found once per band.
    _, first = np.unique(left * n + right, return_index=True)
    return left[first], right[first], distance[first]


def near_duplicate_groups(
    hashes: NDArray[np.uint64] | Sequence[int], max_distance: int, policy: Policy = "greedy",
    workers: int | None = None,
) -> Duplicates:
    """Perceptual near-duplicates: Hamming distance <= ``max_distance`` between 64-bit hashes.

    Returns a :class:`Duplicates` (reason ``near_duplicate``, score = Hamming distance to
    the representative). Policy: see the module docstring (greedy first-wins by default).
    Identical hashes are collapsed first (so a thousand blank frames cost nothing), then
    multi-index hashing (:func:`_plan_bands`) finds every pair within ``max_distance`` --
    exactly, not approximately -- and the pairs are resolved by :func:`_greedy`. Cost grows
    with n times the look-ups per item plus the candidate pairs, which for random-like
    hashes is near linear; hashes concentrated in a few buckets (very similar images) cost
    more, bounded by the number of truly similar pairs.
    """
    values = np.asarray(hashes, dtype=np.uint64).ravel()
    n = values.size
    if max_distance < 0:
        raise ValueError("max_distance must be >= 0")
    if n == 0:
        return Duplicates(np.zeros(0, np.int64), np.zeros(0, np.int32), NEAR_DUPLICATE, "distance")
    # Unique hashes in order of first occurrence: greedy on these equals greedy on all items
    # (a repeat is within 0 of its first occurrence, so it is dropped whatever that one's
    # fate, and dropped items never block anyone).
    uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    unique_hashes = uniq[by_first]
    first_item = first[by_first].astype(np.int64)
    item_rank = rank[inverse.ravel()]  # for each item, its unique hash's position
    m = unique_hashes.size
    if max_distance >= HASH_BITS:
        a = np.zeros(m - 1, dtype=np.int64)
        b = np.arange(1, m, dtype=np.int64)
    elif max_distance == 0 or m == 1:
        a = b = np.zeros(0, dtype=np.int64)
    else:
        a, b, _ = _near_pairs(unique_hashes, max_distance, workers or _default_workers())
    if policy == "greedy":
        rep_rank, _ = _greedy(m, a, b)
        # Every item takes its unique hash's representative: a repeat of a kept hash thus
        # points at that hash's first occurrence, a repeat of a dropped one at its kept rep.
        representative = first_item[rep_rank[item_rank]]
    elif policy == "connected":
        representative = first_item[_connected(m, a, b)[item_rank]]
    else:
        raise ValueError(f"unknown policy {policy!r}")
    distance = hamming_distance(values, values[representative]).astype(np.int32)
    return Duplicates(representative.astype(np.int64), distance, NEAR_DUPLICATE, "distance")


# --------------------------------------------------------------------------- semantic


_LEAF_SIZE: Final = 256  # default points per leaf cluster
_FLAT_MAX: Final = 64  # up to this many clusters, one level of k-means; beyond, two levels
_BLOCK: Final = 1 << 18  # similarity elements per block: 1 MB of float32 stays in cache (D is small,
# so a block that spills to RAM makes the product memory-bound, ~4x slower)


def _kmeans(x: NDArray[np.float32], members: NDArray[np.int64], k: int, rng: np.random.Generator,
            iterations: int = 10, sample_per_cluster: int = 48) -> NDArray[np.float32]:
    """Small Lloyd k-means of the rows ``members`` of ``x`` on a sample (random init); centroids [k, D].

    Cluster quality only affects speed here (boundary spilling handles recall, and the
    pair search inside clusters is exact), so ~50 points per centroid and ten iterations
    are enough; empty clusters are re-seeded at random.
    """
    n = members.size
    sample = x[members[rng.choice(n, size=min(n, k * sample_per_cluster), replace=False)]]
    centroids = sample[rng.choice(sample.shape[0], size=k, replace=False)].copy()
    for _ in range(iterations):
        assign = np.argmax(sample @ centroids.T - 0.5 * np.einsum("kd,kd->k", centroids, centroids), axis=1)
        onehot = scipy.sparse.csr_matrix(
            (np.ones(assign.size, dtype=np.float32), (assign, np.arange(assign.size))), shape=(k, assign.size))
        sums = np.asarray(onehot @ sample, dtype=np.float32)
        sizes = np.bincount(assign, minlength=k)
        empty = sizes == 0
        centroids[~empty] = sums[~empty] / sizes[~empty, None]
        if empty.any():
            centroids[empty] = sample[rng.choice(sample.shape[0], size=int(empty.sum()), replace=False)]
    return centroids


def _route(points: NDArray[np.float32], centroids: NDArray[np.float32], margin: float,
           ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Nearest centroid of each point, plus the clusters within ``margin`` of their boundary.

    Returns (home cluster per point, spilled point positions, spilled clusters). A point x
    in cell A is spilled into B when its distance to the A|B bisector hyperplane,
    (|x-B|^2 - |x-A|^2) / (2 |A-B|), is at most ``margin``: any y within ``margin`` of x that
    is nearer to B than to A must lie across that hyperplane, so with margin = the full
    near-duplicate distance no pair is lost to a boundary.
    """
    half_norm = 0.5 * np.einsum("kd,kd->k", centroids, centroids)
    # |A-B| from the Gram matrix: no [k, k, D] temporary.
    separation = np.sqrt(np.maximum(half_norm[:, None] + half_norm[None, :] - centroids @ centroids.T, 0.0) * 2.0)
    homes, spill_rows, spill_cols = [], [], []
    rows_per_block = max(1, _BLOCK // max(1, centroids.shape[0]))
    for lo in range(0, points.shape[0], rows_per_block):
        score = points[lo:lo + rows_per_block] @ centroids.T - half_norm  # -(|x-c|^2 - |x|^2) / 2
        home = np.argmax(score, axis=1)
        gap = score[np.arange(home.size), home][:, None] - score  # (|x-B|^2 - |x-A|^2) / 2
        near = gap <= margin * separation[home] + 1e-5  # slack for float32 rounding of the scores
        near[np.arange(home.size), home] = False
        r, c = np.divmod(np.flatnonzero(near), centroids.shape[0])  # 2-D nonzero is slow
        homes.append(home)
        spill_rows.append(r + lo)
        spill_cols.append(c)
    return np.concatenate(homes), np.concatenate(spill_rows), np.concatenate(spill_cols)


def _leaf_pairs(x: NDArray[np.float32], home: NDArray[np.int64], query: NDArray[np.int64], threshold: float,
                out: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]]) -> None:
    """Pairs with cosine > threshold among ``home`` (ascending indices) and from ``query`` to ``home``.

    One product [home; query] x home^T in row blocks; for home rows only the strict upper
    triangle counts (each pair once). Computing the home x home square in full costs
    little: spilled queries usually outnumber home points several times.
    """
    if home.size == 0:
        return
    home_x = x[home]
    rows_all = np.concatenate([home, query])
    step = max(1, _BLOCK // home.size)
    for lo in range(0, rows_all.size, step):
        rows = rows_all[lo:lo + step]
        sim = (home_x[lo:lo + step] if lo + rows.size <= home.size else x[rows]) @ home_x.T
        # flatnonzero + divmod: 2-D np.nonzero is ~20x slower, and hits are rare.
        flat = np.flatnonzero(sim > threshold)
        if flat.size == 0:
            continue
        r, c = np.divmod(flat, home.size)
        # Home rows: keep the upper triangle only (also drops the diagonal, cosine 1).
        keep = (r + lo >= home.size) | (c > r + lo)
        r, c, flat = r[keep], c[keep], flat[keep]
        left, right = rows[r], home[c]
        out.append((np.minimum(left, right), np.maximum(left, right), sim.ravel()[flat]))


_ROUTE_ROWS: Final = 1 << 15  # points per routing task


def semantic_duplicates(
    embeddings: NDArray[np.floating[Any]], threshold_cosine: float, n_clusters: int | None = None,
    seed: int = 0, *, spill: float = 0.125, policy: Policy = "greedy", workers: int | None = None,
) -> Duplicates:
    """SemDeDup-style semantic duplicates: cosine similarity > ``threshold_cosine`` within k-means clusters.

    ``embeddings`` [N, D] are L2-normalised here (so any scale is fine; zero rows never
    match). Points are clustered with k-means into ``n_clusters`` leaf clusters (default
    N / 256): one level up to 64 clusters, else a two-level tree of ~sqrt(n_clusters)
    x ~sqrt(n_clusters) clusters, so assignment costs N * 2 sqrt(n_clusters) * D instead of
    N * n_clusters * D. Inside each leaf every pair is compared (a matrix product in blocks
    of 256K similarities, so memory is bounded whatever the cluster size).

    Plain SemDeDup misses duplicates that a cluster boundary separates (31-38% of them for
    64-d random data at 100k-1M points). So a point within
    ``spill * sqrt(2 - 2 * threshold_cosine)`` of a boundary (that square root is the largest
    distance between two unit vectors above the threshold) is also compared, as a query,
    against the points of the neighbouring cluster. ``spill=1`` finds every pair above the
    threshold exactly (the same result as all-pairs, up to float32 rounding at the
    threshold, at a cost that can approach all-pairs on unclustered data); ``spill=0`` is
    plain SemDeDup; the default 0.125 found >= 99.5% of planted duplicates (cosine
    0.96-0.995 at threshold 0.95) on isotropic 64-d data, the hardest case for clustering
    (no structure at all), for 2-4x plain SemDeDup's time.

    Complexity: O(N * (k1 + s * k2) * D) for the assignment, plus the sum over leaves of
    (home_size + spilled_in) * home_size * D for the pairs, i.e. about
    s * N * (N / n_clusters) * D with s the mean number of leaves a point is compared in
    (~6 with the default spill on 64-d random data at 1M points).
    Work is spread over ``workers`` threads (default: the usable cores) with BLAS held to
    one thread each (process-wide while this runs, via threadpoolctl when installed). The
    result does not depend on ``workers`` or thread timing: k-means seeds derive from
    ``seed`` and the cluster's position in the tree. Returns a :class:`Duplicates` (reason
    ``semantic_duplicate``, score = cosine similarity to the representative).
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected [N, D] embeddings, got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        return Duplicates(np.zeros(0, np.int64), np.zeros(0, np.float32), SEMANTIC_DUPLICATE, "similarity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0).astype(np.float32)
    threshold = float(threshold_cosine)
    leaves = max(1, min(n, n_clusters if n_clusters is not None else round(n / _LEAF_SIZE)))
    if leaves <= _FLAT_MAX:
        branching = [leaves]
    else:
        k1 = max(1, round(math.sqrt(leaves)))
        branching = [k1, math.ceil(leaves / k1)]
    margin = spill * math.sqrt(max(0.0, 2.0 - 2.0 * threshold))
    n_workers = workers or _default_workers()

    with _blas_single_thread():
        # Entries route (point, cell) down the tree; "home" marks each point's one true leaf,
        # the others are spilled copies that only query that leaf's home points.
        point = np.arange(n, dtype=np.int64)
        cell = np.zeros(n, dtype=np.int64)
        is_home = np.ones(n, dtype=bool)
        for level, k in enumerate(branching):
            order = np.argsort(cell, kind="stable")
            point, cell, is_home = point[order], cell[order], is_home[order]
            bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
            spans = list(itertools.pairwise(bounds.tolist()))

            def fit(span: tuple[int, int], level: int = level, k: int = k) -> NDArray[np.float32] | None:
                """k-means centroids of one cell's home points (None: too few to split)."""
                lo, hi = span
                home_members = point[lo:hi][is_home[lo:hi]]
                if min(k, home_members.size) <= 1:
                    return None  # nothing to split: the cell passes down as child 0
                rng = np.random.default_rng([seed, level, int(cell[lo])])
                return _kmeans(x, home_members, min(k, home_members.size), rng)

            centroids = _parallel_map(fit, spans, n_workers)
            # Routing tasks: row chunks of every cell, so one giant root cell is parallel too.
            tasks = [(c, lo, min(hi, lo + _ROUTE_ROWS))
                     for c, (span_lo, hi) in enumerate(spans) if centroids[c] is not None
                     for lo in range(span_lo, hi, _ROUTE_ROWS)]

            def route(task: tuple[int, int, int], k: int = k) -> tuple[NDArray[np.int64], ...]:
                """Home child and spilled children of one row chunk of a cell."""
                c, lo, hi = task
                home, spill_rows, spill_cols = _route(x[point[lo:hi]], centroids[c], margin)
                base = cell[lo] * k
                return (point[lo:hi], base + home, is_home[lo:hi],
                        point[lo + spill_rows], base + spill_cols, np.zeros(spill_rows.size, dtype=bool))

            parts = _parallel_map(route, tasks, n_workers)
            for c, (lo, hi) in enumerate(spans):
                if centroids[c] is None:
                    parts.append((point[lo:hi], cell[lo:hi] * k, is_home[lo:hi]))
            point = np.concatenate([p for part in parts for p in part[0::3]])
            cell = np.concatenate([p for part in parts for p in part[1::3]])
            is_home = np.concatenate([p for part in parts for p in part[2::3]])

        # By leaf, then by item index (home rows ascending); one int64 key sorts ~3x faster
        # than lexsort, and cell ids stay far below 2**63 / n.
        order = np.argsort(cell * n + point)
        point, cell, is_home = point[order], cell[order], is_home[order]
        bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
        leaf_spans = list(itertools.pairwise(bounds.tolist()))
        home_counts = np.add.reduceat(is_home.astype(np.int64), bounds[:-1]) if point.size else np.zeros(0)
        sizes = np.diff(bounds)
        work = (home_counts * sizes).astype(np.float64) + 64.0  # + per-leaf overhead

        def search(chunk: tuple[int, int]) -> list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]]:
            """Pairs above the threshold in a run of leaves."""
            out: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]] = []
            for lo, hi in leaf_spans[chunk[0]:chunk[1]]:
                members, home_mask = point[lo:hi], is_home[lo:hi]
                _leaf_pairs(x, members[home_mask], members[~home_mask], threshold, out)
            return out

        found = [f for part in _parallel_map(search, _balanced_chunks(work, 8 * n_workers), n_workers)
                 for f in part]

    if found:
        a = np.concatenate([f[0] for f in found])
        b = np.concatenate([f[1] for f in found])
        sim = np.concatenate([f[2] for f in found])
        # A pair can be found from both sides when both points were spilled.
        _, first = np.unique(a * n + b, return_index=True)
        a, b, sim = a[first], b[first], sim[first]
    else:
        a = b = np.zeros(0, dtype=np.int64)
        sim = np.zeros(0, dtype=np.float32)
    if policy == "greedy":
        representative, edge = _greedy(n, a, b)
        similarity = np.where(edge >= 0, sim[np.maximum(edge, 0)] if sim.size else 1.0, 1.0).astype(np.float32)
    elif policy == "connected":
        representative = _connected(n, a, b)
        similarity = np.einsum("nd,nd->n", x, x[representative]).astype(np.float32)
        similarity[representative == np.arange(n)] = 1.0
    else:
        raise ValueError(f"unknown policy {policy!r}")
    return Duplicates(representative, similarity, SEMANTIC_DUPLICATE, "similarity")
