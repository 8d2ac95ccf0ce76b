"""The dedup reference retraining carries from one dataset to the next: it grows, and damage is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.curate.reference import REFERENCE, REFERENCE_EMBEDDINGS, Reference


def _reference(ids: list[str], dim: int = 4) -> Reference:
    return Reference.of_dataset(pd.DataFrame({"id": ids, "phash": range(len(ids))}),
                                np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim))


def test_union_appends_new_samples_once_and_keeps_embedding_rows_aligned(tmp_path: Path) -> None:
    grown = _reference(["a", "b"]).union(_reference(["b", "c"]))
    assert grown.rows["id"].tolist() == ["a", "b", "c"]
    c_row = grown.rows.set_index("id").loc["c", "embedding_row"]
    assert np.array_equal(grown.embeddings[c_row], _reference(["b", "c"]).embeddings[1])
    grown.save(tmp_path)
    again = Reference.load(tmp_path)
    assert again.rows.equals(grown.rows) and np.array_equal(again.embeddings, grown.embeddings)
    assert Reference.empty().union(grown).rows["id"].tolist() == ["a", "b", "c"]


def test_a_dataset_without_embeddings_still_gives_its_hashes() -> None:
    reference = Reference.of_dataset(pd.DataFrame({"id": ["a"], "phash": [5]}), None)
    assert reference.rows["embedding_row"].tolist() == [-1] and reference.rows["phash"].tolist() == [5]


def test_damaged_or_mismatched_references_say_which_file_and_why(tmp_path: Path) -> None:
    _reference(["a", "b"]).save(tmp_path)
    np.save(tmp_path / REFERENCE_EMBEDDINGS, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=f"{REFERENCE}: embedding_row points past the 1 rows"):
        Reference.load(tmp_path)
    (tmp_path / REFERENCE).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="the dedup reference .* cannot be read"):
        Reference.load(tmp_path)
    with pytest.raises(ValueError, match="4-d but the new ones 8-d"):
        _reference(["a"]).union(_reference(["b"], dim=8))
    assert Reference.load(tmp_path / "nowhere") is None
