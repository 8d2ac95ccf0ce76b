"""Caption embeddings cached on disk: each caption encoded once per encoder, across processes and runs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from components.text_cache import TextEmbeddingCache, encoder_identity
from models.text_encoder import TextEmbeddings


class CountingEncoder:
    """A stand-in with TextEncoder's interface: deterministic per-caption rows, counts what it encodes."""

    def __init__(self, max_tokens: int = 4, dim: int = 3, salt: str = "") -> None:
        self.max_tokens, self.dim, self.salt = max_tokens, dim, salt
        self.calls: list[list[str]] = []

    def encode(self, captions: list[str]) -> TextEmbeddings:
        self.calls.append(list(captions))
        seeds = [int(hashlib.sha256((self.salt + c).encode()).hexdigest()[:8], 16) for c in captions]
        tokens = torch.stack([torch.randn(self.max_tokens, self.dim, generator=torch.Generator().manual_seed(s))
                              for s in seeds]) if captions else torch.zeros(0, self.max_tokens, self.dim)
        mask = torch.arange(self.max_tokens)[None, :] < torch.tensor([1 + len(c) % self.max_tokens for c in captions]
                                                                     ).reshape(-1, 1)
        return TextEmbeddings(tokens, mask, tokens.mean(1))

    @property
    def encoded(self) -> list[str]:
        return [c for call in self.calls for c in call]


def _assert_same(a: TextEmbeddings, b: TextEmbeddings) -> None:
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_results_follow_caption_order_and_duplicates_are_encoded_once(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    cache = TextEmbeddingCache(tmp_path, "fake", max_tokens=4)
    captions = ["a dog", "a cat", "a dog", "", "a bird", "a cat"]
    got = cache.get(captions, encoder)
    assert sorted(encoder.encoded) == sorted({"a dog", "a cat", "", "a bird"})
    _assert_same(got, CountingEncoder().encode(captions))


def test_a_second_run_encodes_nothing_and_a_third_only_new_captions(tmp_path: Path) -> None:
    first = CountingEncoder()
    TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["a dog", "a cat"], first)
    again = CountingEncoder()  # another process: a new cache object on the same directory
    got = TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["a cat", "a dog", "a cat"], again)
    assert again.calls == []
    _assert_same(got, CountingEncoder().encode(["a cat", "a dog", "a cat"]))
    third = CountingEncoder()
    TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["a cat", "a fish"], third)
    assert third.encoded == ["a fish"]


def test_a_different_encoder_or_length_never_reads_stale_rows(tmp_path: Path) -> None:
    TextEmbeddingCache(tmp_path, "minilm@aaaa", max_tokens=4).get(["a dog"], CountingEncoder())
    other_model = CountingEncoder(salt="other")
    got = TextEmbeddingCache(tmp_path, "minilm@bbbb", max_tokens=4).get(["a dog"], other_model)
    assert other_model.encoded == ["a dog"]
    _assert_same(got, CountingEncoder(salt="other").encode(["a dog"]))
    first_again = CountingEncoder()
    TextEmbeddingCache(tmp_path, "minilm@aaaa", max_tokens=4).get(["a dog"], first_again)
    assert first_again.calls == [], "the first encoder's rows are still there"
    longer = CountingEncoder(max_tokens=6)
    assert TextEmbeddingCache(tmp_path, "minilm@aaaa", max_tokens=6).get(["a dog"], longer).tokens.shape[1] == 6
    assert longer.encoded == ["a dog"]
    with pytest.raises(ValueError, match="max_tokens"):
        TextEmbeddingCache(tmp_path, "minilm@aaaa", max_tokens=4).get(["a dog"], CountingEncoder(max_tokens=6))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_shard_is_reported_and_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = TextEmbeddingCache(tmp_path, "fake", max_tokens=4)
    cache.get(["a dog", "a cat"], CountingEncoder())
    [shard] = cache.directory.glob("rows-*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes({"truncate": data[: len(data) - 20], "garbage": b"\x07" * len(data), "empty": b""}[damage])
    encoder = CountingEncoder()
    with caplog.at_level(logging.WARNING, logger="components.text_cache"):
        got = TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["a cat", "a dog"], encoder)
    assert "unreadable" in caplog.text
    assert sorted(encoder.encoded) == ["a cat", "a dog"]
    _assert_same(got, CountingEncoder().encode(["a cat", "a dog"]))
    rebuilt = CountingEncoder()
    TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["a cat", "a dog"], rebuilt)
    assert rebuilt.calls == [], "the rebuilt rows were stored"


def test_two_caches_writing_one_directory_keep_every_row(tmp_path: Path) -> None:
    a, b = TextEmbeddingCache(tmp_path, "fake", max_tokens=4), TextEmbeddingCache(tmp_path, "fake", max_tokens=4)
    a.get(["one", "two"], CountingEncoder())
    b.get(["two", "three"], CountingEncoder())  # b sees a's shard: only "three" is new
    a.get(["four"], CountingEncoder())
    reader = CountingEncoder()
    got = TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["four", "three", "two", "one"], reader)
    assert reader.calls == []
    _assert_same(got, CountingEncoder().encode(["four", "three", "two", "one"]))
    assert not list(a.directory.glob(".tmp-*")), "no temporary files left behind"


def test_small_shards_are_merged_without_losing_rows(tmp_path: Path) -> None:
    cache = TextEmbeddingCache(tmp_path, "fake", max_tokens=4, compact_after=3)
    for word in ["one", "two", "three", "four"]:
        cache.get([word], CountingEncoder())
    assert len(list(cache.directory.glob("rows-*.safetensors"))) < 4
    reader = CountingEncoder()
    got = TextEmbeddingCache(tmp_path, "fake", max_tokens=4).get(["four", "three", "two", "one"], reader)
    assert reader.calls == []
    _assert_same(got, CountingEncoder().encode(["four", "three", "two", "one"]))


@pytest.mark.usefixtures("single_thread")
def test_real_minilm_rows_from_the_cache_equal_direct_encoding(tmp_path: Path) -> None:
    from models.text_encoder import TextEncoder

    encoder = TextEncoder(max_tokens=16)
    captions = ["a red apple on a table", "a fire truck", "a red apple on a table", ""]
    identity = encoder_identity(encoder)
    assert identity == encoder_identity(encoder) and identity.startswith(encoder.model_path.name)
    TextEmbeddingCache(tmp_path, identity, max_tokens=16).get(captions, encoder)
    cache = TextEmbeddingCache(tmp_path, identity, max_tokens=16)
    got = cache.get(captions, encoder)
    assert cache.encoded == 0
    _assert_same(got, encoder.encode(captions))
