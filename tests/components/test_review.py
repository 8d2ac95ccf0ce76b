"""The human review loop on a real curated-dataset directory: export a contact sheet, import labels, train a head."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.config import AestheticConfig
from components.curate.aesthetic import (
    HEAD_FILE,
    LABELS_FILE,
    DefaultAestheticScorer,
    LearnedAestheticScorer,
    load_aesthetic_scorer,
    review_labels,
)
from components.curate.review import (
    CANDIDATES_COLUMNS,
    NotACuratedDatasetError,
    ReviewError,
    export_review,
    import_review,
)
from components.media import image_to_png_bytes, technical_quality
from components.storage import ShardWriter, write_manifest
from models.vision_features import ImageFeatureExtractor
from pipelines.cli import main as cli
from tests.conftest import tuxpaint_subset

SIDE = 64
# The reviewer in these tests accepts this Tux Paint category and rejects the others.
ACCEPTED = "symbols"


def _rgb(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    return canvas.convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, single_thread) -> Path:
    """A curated dataset directory in the stage's layout: 48 Tux Paint stamps (8 in val), shards,
    manifest with scores, and embeddings.npy (EfficientNet-Lite0 at 128 px) in manifest order."""
    root = tmp_path_factory.mktemp("review")
    stamps = sorted(tuxpaint_subset(root / "stamps", 48).rglob("*.png"))
    images = [_rgb(path) for path in stamps]
    arrays = [np.asarray(image) for image in images]
    directory = root / "curated"
    rows = []
    writers = {split: ShardWriter(directory, split, shard_size=16) for split in ("train", "val")}
    for index, (path, image, array) in enumerate(zip(stamps, images, arrays)):
        sample_id = f"{path.stem.replace('.', '_')}-{index:03d}"
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").splitlines()[0] if caption_file.exists() else ""
        split = "val" if index % 6 == 5 else "train"
        shard = writers[split].write(sample_id, {"png": image_to_png_bytes(image), "txt": caption.encode(),
                                                 "json": json.dumps({"id": sample_id}).encode()})
        rows.append({"id": sample_id, "caption": caption, "caption_source": "source", "split": split,
                     "shard": shard, "bucket": "1:1", "category": path.relative_to(root / "stamps").parts[0],
                     "quality": technical_quality(array)["quality"]})
    for writer in writers.values():
        writer.close()
    manifest = pd.DataFrame(rows)
    manifest["aesthetic"] = DefaultAestheticScorer().score(arrays, None)
    write_manifest(manifest, directory)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    features = ImageFeatureExtractor(input_size=128).features(pixels).numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    np.save(directory / "embeddings.npy", features.astype(np.float32))
    return directory


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] = CANDIDATES_COLUMNS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_export_writes_a_contact_sheet_with_every_candidate_and_a_blank_label_csv(dataset: Path,
                                                                                 tmp_path: Path) -> None:
    index = export_review(dataset, tmp_path / "sheet", limit=10)
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    train = manifest[manifest["split"] == "train"]
    rows = _read_csv(tmp_path / "sheet" / "candidates.csv")
    assert list(rows[0]) == CANDIDATES_COLUMNS
    assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    assert all(r["label"] == "" and r["notes"] == "" for r in rows)
    # The first ten are the top ten by aesthetic; the rest come from across the remaining range.
    top = train.sort_values(["aesthetic", "id"], ascending=[False, True])
    assert [r["id"] for r in rows[:10]] == top["id"].head(10).tolist()
    rest_scores = [float(r["aesthetic"]) for r in rows[10:]]
    remaining = top["aesthetic"].iloc[10:]
    assert min(rest_scores) <= remaining.quantile(0.2) and max(rest_scores) >= remaining.quantile(0.8)
    assert set(r["id"] for r in rows) <= set(train["id"])

    page = index.read_text(encoding="utf-8")
    for row in rows:
        assert row["id"] in page
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 20
    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (SIDE, SIDE)
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "sortCards" in page and "candidates.csv" in page


def test_export_names_a_bad_sort_column(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot sort by 'prettiness'.*numeric columns: .*aesthetic"):
        export_review(dataset, tmp_path / "sheet", limit=5, sort_by="prettiness")


def test_import_trains_a_head_that_tells_the_labelled_categories_apart(dataset: Path, tmp_path: Path) -> None:
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    export_review(dataset, tmp_path / "sheet", limit=100)  # everything in train
    rows = _read_csv(tmp_path / "sheet" / "candidates.csv")
    category = dict(zip(manifest["id"], manifest["category"]))
    spellings = {True: ["accept", "Accept", "1", " ACCEPT "], False: ["reject", "REJECT", "0"]}
    for number, row in enumerate(rows):
        if number % 7 == 6:
            continue  # left blank: skipped
        choices = spellings[category[row["id"]] == ACCEPTED]
        row["label"] = choices[number % len(choices)]
        row["notes"] = "reviewer A"
    csv_path = _write_csv(tmp_path / "labelled.csv", rows)
    review_dir = tmp_path / "review"

    result = import_review(csv_path, dataset, review_dir)
    blank = sum(1 for n in range(len(rows)) if n % 7 == 6)
    assert result.rows_blank == blank and result.rows_labelled == len(rows) - blank == result.n_labels
    assert result.n_accept == sum(category[r["id"]] == ACCEPTED for n, r in enumerate(rows) if n % 7 != 6)
    assert result.train_accuracy >= 0.9 and result.cv_accuracy is not None and result.cv_accuracy >= 0.7
    labels = pd.read_parquet(review_dir / LABELS_FILE)
    assert list(labels.columns) == ["id", "label", "notes"] and set(labels["label"]) == {"accept", "reject"}
    assert (review_dir / HEAD_FILE).is_file()
    sidecar = json.loads((review_dir / "aesthetic_head.json").read_text())
    assert sidecar["n_labels"] == result.n_labels and sidecar["feature_dim"] == 1280

    # The head scores the held-out val split: the accepted category above the others on average.
    config = AestheticConfig(review_dir=str(review_dir))
    scorer = load_aesthetic_scorer(config)
    assert isinstance(scorer, LearnedAestheticScorer)
    embeddings = np.load(dataset / "embeddings.npy")
    val = manifest.index[manifest["split"] == "val"]
    scores = scorer.score([np.zeros((4, 4, 3), np.uint8)] * len(val), embeddings[val])
    accepted = (manifest.loc[val, "category"] == ACCEPTED).to_numpy()
    assert accepted.any() and (~accepted).any()
    assert scores[accepted].mean() > scores[~accepted].mean() + 0.2
    assert review_labels(config) == dict(zip(labels["id"], labels["label"]))


def test_reimport_merges_and_the_later_label_wins(dataset: Path, tmp_path: Path) -> None:
    manifest = pd.read_parquet(dataset / "manifest.parquet")
    ids = manifest["id"].tolist()
    first = [{"id": i, "label": "accept" if n < 3 else "reject", "notes": "round 1"} for n, i in enumerate(ids[:6])]
    import_review(_write_csv(tmp_path / "one.csv", first), dataset, tmp_path / "review")
    second = [{"id": ids[0], "label": "reject", "notes": "changed my mind"},
              {"id": ids[10], "label": "accept", "notes": "round 2"}]
    result = import_review(_write_csv(tmp_path / "two.csv", second), dataset, tmp_path / "review")
    labels = pd.read_parquet(tmp_path / "review" / LABELS_FILE).set_index("id")
    assert result.n_labels == 7 == len(labels)
    assert labels.loc[ids[0], "label"] == "reject" and labels.loc[ids[0], "notes"] == "changed my mind"
    assert labels.loc[ids[1], "label"] == "accept" and labels.loc[ids[10], "label"] == "accept"
    assert result.cv_accuracy is None  # fewer than 10 labels


def test_import_errors_name_the_row_and_the_value(dataset: Path, tmp_path: Path) -> None:
    ids = pd.read_parquet(dataset / "manifest.parquet")["id"].tolist()
    rows = [{"id": ids[0], "label": "accept"}, {"id": ids[1], "label": "yes"},
            {"id": "no-such-sample", "label": "reject"}, {"id": ids[2], "label": ""}]
    with pytest.raises(ReviewError) as error:
        import_review(_write_csv(tmp_path / "bad.csv", rows), dataset, tmp_path / "review")
    message = str(error.value)
    assert "row 3: label 'yes' is not accept, reject, 1 or 0" in message
    assert "row 4: id 'no-such-sample' is not in this dataset" in message
    assert "2 bad row(s)" in message and not (tmp_path / "review").exists()

    with pytest.raises(ReviewError, match="header has no label column"):
        import_review(_write_csv(tmp_path / "nolabel.csv", rows, ["id", "caption"]), dataset, tmp_path / "review")
    few = [{"id": ids[0], "label": "accept"}, {"id": ids[1], "label": "reject"}, {"id": ids[2], "label": "reject"}]
    with pytest.raises(ReviewError, match=r"labels saved to .*at least 2 'accept' and 2 'reject'.*got 1 accept"):
        import_review(_write_csv(tmp_path / "few.csv", few), dataset, tmp_path / "review")
    assert len(pd.read_parquet(tmp_path / "review" / LABELS_FILE)) == 3


def test_import_accepts_a_spreadsheet_export_with_bom_and_extra_columns(dataset: Path, tmp_path: Path) -> None:
    ids = pd.read_parquet(dataset / "manifest.parquet")["id"].tolist()
    text = "Notes,Label,ID,rating\r\n" + "".join(
        f"ok,{'1' if n % 2 else '0'},{i},5\r\n" for n, i in enumerate(ids[:8]))
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = import_review(path, dataset, tmp_path / "review")
    assert (result.n_accept, result.n_reject) == (4, 4)


def test_cli_review_export_and_import(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sheet = tmp_path / "sheet"
    assert cli(["review", "export", "--dataset", str(dataset), "--out", str(sheet), "--limit", "6",
                "--sort-by", "quality"]) == 0
    printed = capsys.readouterr().out
    assert str(sheet / "index.html") in printed and "reelforge review import" in printed
    rows = _read_csv(sheet / "candidates.csv")
    for number, row in enumerate(rows):
        row["label"] = "accept" if number < 6 else "reject"
    _write_csv(sheet / "candidates.csv", rows)
    review_dir = tmp_path / "review"
    assert cli(["review", "import", "--labels", str(sheet / "candidates.csv"), "--dataset", str(dataset),
                "--out", str(review_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"--set curate.aesthetic.review_dir={review_dir}" in printed and "cross-validated accuracy" in printed
    assert (review_dir / HEAD_FILE).is_file()

    # Pointing at the folder above the dataset: a clear error that names the dataset inside it.
    assert cli(["review", "import", "--labels", str(sheet / "candidates.csv"), "--dataset", str(dataset.parent),
                "--out", str(review_dir)]) == 2
    error = capsys.readouterr().err
    assert "is not a curated dataset: manifest.parquet and embeddings.npy missing" in error
    assert str(dataset) in error
    with pytest.raises(NotACuratedDatasetError):
        export_review(tmp_path / "missing", tmp_path / "out", limit=3)

