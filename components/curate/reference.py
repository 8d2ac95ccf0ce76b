"""An earlier dataset to deduplicate against: what retraining's curation must not take twice.

Ingest already leaves out files whose bytes an earlier dataset holds (sha256). A re-encoded,
resized or re-captioned copy has other bytes, so curation also compares each new sample with
the samples of the champion's dataset (and its ancestors') by perceptual hash and by image
embedding, with the recipe's `curate.dedup` thresholds. The reference is small beside the
dataset it stands for: one 64-bit hash and one embedding per accepted sample.

Files (in a reference directory: the champion stage's `known` output, copied next to the raw
shards by ingest, and logged by curate as MLflow artifacts of the dataset's run):

  reference.parquet            id, phash (Int64, the recipe's hash; missing for clips without one),
                               embedding_row (row in reference_embeddings.npy, -1 for none)
  reference_embeddings.npy     float32 [M, D], the curation image embeddings

Each curate run logs the reference it started from plus the samples it accepted, so the
reference of a retrained champion still holds every ancestor's samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE = "reference.parquet"
REFERENCE_EMBEDDINGS = "reference_embeddings.npy"
FILES = (REFERENCE, REFERENCE_EMBEDDINGS)


@dataclass(frozen=True)
class Reference:
    """Samples of earlier datasets: ids, perceptual hashes and embeddings (rows of `embeddings`)."""

    rows: pd.DataFrame  # id (str), phash (Int64), embedding_row (int64, -1 = none)
    embeddings: np.ndarray  # float32 [M, D]

    def __len__(self) -> int:
        """Number of reference samples."""
        return len(self.rows)

    @classmethod
    def empty(cls) -> Reference:
        """No earlier dataset (a first training run)."""
        return cls(pd.DataFrame({"id": pd.Series(dtype=str), "phash": pd.Series(dtype="Int64"),
                                 "embedding_row": pd.Series(dtype=np.int64)}), np.zeros((0, 0), np.float32))

    @classmethod
    def load(cls, directory: Path) -> Reference | None:
        """The reference in `directory`, or None when it has none; a damaged one is an error naming the file."""
        directory = Path(directory)
        if not (directory / REFERENCE).is_file():
            return None
        try:
            rows = pd.read_parquet(directory / REFERENCE)
            embeddings = np.load(directory / REFERENCE_EMBEDDINGS, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{directory}: the dedup reference ({', '.join(FILES)}) cannot be read: {error}") from None
        missing = {"id", "phash", "embedding_row"} - set(rows.columns)
        if missing:
            raise ValueError(f"{directory / REFERENCE}: missing columns {sorted(missing)}")
        rows = rows.assign(id=rows["id"].astype(str), phash=rows["phash"].astype("Int64"),
                           embedding_row=rows["embedding_row"].astype(np.int64))
        if len(rows) and rows["embedding_row"].max() >= len(embeddings):
            raise ValueError(f"{directory / REFERENCE}: embedding_row points past the {len(embeddings)} rows of "
                             f"{REFERENCE_EMBEDDINGS}")
        return cls(rows.reset_index(drop=True), embeddings.astype(np.float32, copy=False))

    @classmethod
    def of_dataset(cls, manifest: pd.DataFrame, embeddings: np.ndarray | None) -> Reference:
        """A curated dataset's accepted samples (manifest row i = embeddings row i, when there are any)."""
        has_embeddings = embeddings is not None and len(embeddings) == len(manifest) and embeddings.size > 0
        phash = manifest["phash"].astype("Int64") if "phash" in manifest else pd.Series(pd.NA, index=manifest.index,
                                                                                        dtype="Int64")
        rows = pd.DataFrame({"id": manifest["id"].astype(str).to_numpy(), "phash": phash.to_numpy(),
                             "embedding_row": np.arange(len(manifest)) if has_embeddings else -1})
        rows["phash"] = rows["phash"].astype("Int64")
        rows["embedding_row"] = rows["embedding_row"].astype(np.int64)
        return cls(rows, np.asarray(embeddings, np.float32) if has_embeddings else np.zeros((0, 0), np.float32))

    def union(self, other: Reference) -> Reference:
        """This reference followed by `other` (ids already here are not added twice)."""
        other_rows = other.rows[~other.rows["id"].isin(set(self.rows["id"]))]
        if not len(self.embeddings):
            base, embeddings = 0, other.embeddings
        elif not len(other.embeddings):
            base, embeddings = len(self.embeddings), self.embeddings
        elif self.embeddings.shape[1] != other.embeddings.shape[1]:
            raise ValueError(f"dedup reference embeddings are {self.embeddings.shape[1]}-d but the new ones "
                             f"{other.embeddings.shape[1]}-d: was curate.embedding changed between runs?")
        else:
            base, embeddings = len(self.embeddings), np.concatenate([self.embeddings, other.embeddings])
        shifted = other_rows.assign(embedding_row=np.where(other_rows["embedding_row"] >= 0,
                                                           other_rows["embedding_row"] + base, -1))
        rows = pd.concat([self.rows, shifted], ignore_index=True) if len(self.rows) else shifted.reset_index(drop=True)
        rows["phash"] = rows["phash"].astype("Int64")
        rows["embedding_row"] = rows["embedding_row"].astype(np.int64)
        return Reference(rows, embeddings)

    def save(self, directory: Path) -> list[Path]:
        """Write both files into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.rows.to_parquet(directory / REFERENCE, index=False)
        np.save(directory / REFERENCE_EMBEDDINGS, self.embeddings.astype(np.float32, copy=False))
        return [directory / name for name in FILES]
