"""The human review loop: export a contact sheet of candidates, import the labels, train a head.

Emu's quality-tuning set is picked by people in two passes (a generalist pass over many
candidates, then specialists). reelforge supports the first pass offline:

1. ``export_review`` writes ``index.html`` (a self-contained contact sheet: thumbnails,
   captions and scores, sortable, opens without a network) and ``candidates.csv``
   (``id,caption,aesthetic,quality,label,notes``, label empty). Candidates are the top
   ``limit`` samples by a score column plus a random sample of the rest, stratified over that
   score's range, so reviewers also see (and can label) mediocre and bad samples: a head
   trained only on the top would never learn what "reject" looks like.
2. The reviewer fills ``label`` with ``accept`` or ``reject`` (any case; ``1``/``0`` work too;
   blank = skip) in any spreadsheet and saves it as CSV (extra columns, reordered columns and
   Excel's UTF-8 BOM are fine).
3. ``import_review`` validates the CSV against the dataset, merges the labels into
   ``review_dir/labels.parquet`` (a later import wins for an id labelled twice, so reviews
   can be done in rounds), trains an :class:`AestheticHead` on the dataset's embeddings and
   saves ``review_dir/aesthetic_head.safetensors`` (+ ``.json`` sidecar).
4. Curate again with ``--set curate.aesthetic.review_dir=REVIEW_DIR``: the head scores
   aesthetics, and the labels steer the quality-tuning set (accepts first, rejects out).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
from PIL import Image

from components.curate.aesthetic import HEAD_FILE, LABELS_FILE, AestheticHead
from components.storage import MANIFEST, iter_shard, shard_paths, write_manifest

EMBEDDINGS: Final[str] = "embeddings.npy"
CANDIDATES_COLUMNS: Final[list[str]] = ["id", "caption", "aesthetic", "quality", "label", "notes"]
# Score columns shown on each card when the manifest has them.
_SHOWN_SCORES: Final[list[str]] = ["aesthetic", "quality", "sharpness", "brisque", "alignment", "text_area", "unsafe"]
_LABEL_VALUES: Final[dict[str, str]] = {"accept": "accept", "1": "accept", "reject": "reject", "0": "reject"}
_THUMBNAIL_SIDE: Final[int] = 192
_STRATA: Final[int] = 5
_MAX_ERRORS_SHOWN: Final[int] = 20


class NotACuratedDatasetError(FileNotFoundError):
    """The directory given as a dataset is not a curated dataset (says what is missing and where to look)."""


class ReviewError(ValueError):
    """A review CSV or review directory is unusable; the message names the row and the value."""


@dataclass(frozen=True)
class ReviewResult:
    """What an import wrote and how well the trained head fits."""

    review_dir: Path
    labels_path: Path
    head_path: Path
    rows_labelled: int  # rows of this CSV with a label
    rows_blank: int  # rows of this CSV left unlabelled (ignored)
    n_labels: int  # labels in review_dir after merging with earlier imports
    n_accept: int
    n_reject: int
    n_trained: int  # labels whose sample is in this dataset (the head's training set)
    train_accuracy: float
    cv_accuracy: float | None  # stratified 5-fold accuracy, when there are >= 10 labels


def _find_datasets(root: Path, limit: int = 5, max_dirs: int = 5000) -> list[Path]:
    """Curated dataset dirs under `root` (manifest + embeddings), for the "did you mean" hint.

    Looks at no more than `max_dirs` directories, so pointing at a huge tree stays quick.
    """
    found: list[Path] = []
    for visited, (folder, _, files) in enumerate(os.walk(root)):
        if visited >= max_dirs or len(found) >= limit:
            break
        if EMBEDDINGS in files and MANIFEST in files:
            found.append(Path(folder))
    return sorted(found)


def check_dataset(dataset_dir: Path, *, need_embeddings: bool) -> None:
    """Raise :class:`NotACuratedDatasetError` unless `dataset_dir` holds a curated dataset."""
    dataset_dir = Path(dataset_dir)
    required = [MANIFEST] + ([EMBEDDINGS] if need_embeddings else [])
    missing = [name for name in required if not (dataset_dir / name).is_file()]
    if not missing:
        return
    if not dataset_dir.is_dir():
        problem = f"{dataset_dir} does not exist"
    else:
        problem = f"{dataset_dir} is not a curated dataset: {' and '.join(missing)} missing"
    hint = ""
    if dataset_dir.is_dir():
        candidates = _find_datasets(dataset_dir)
        if candidates:
            hint = "; curated datasets under it: " + ", ".join(str(p) for p in candidates)
    if not hint:
        hint = ("; pass the curate stage's output directory (it holds manifest.parquet, embeddings.npy and "
                "train-*.tar), e.g. find it with `find WORKDIR -name embeddings.npy`")
    raise NotACuratedDatasetError(problem + hint)


def _load_manifest(dataset_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(dataset_dir) / MANIFEST)


def load_embeddings(dataset_dir: Path, manifest: pd.DataFrame) -> np.ndarray:
    """The dataset's [N, D] embeddings, checked to pair up row by row with its manifest."""
    path = Path(dataset_dir) / EMBEDDINGS
    embeddings = np.load(path, allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(manifest):
        raise ReviewError(f"{path} has shape {embeddings.shape} but {MANIFEST} has {len(manifest)} rows; "
                          "row i of the embeddings must belong to manifest row i")
    return embeddings


# ---------------------------------------------------------------------------------------------
# Export


def _pick_candidates(frame: pd.DataFrame, sort_by: str, limit: int, extra: int, seed: int) -> pd.DataFrame:
    """Top `limit` rows by `sort_by`, then `extra` random rows from equal-size score strata of the rest."""
    score = pd.to_numeric(frame[sort_by], errors="coerce")
    ordered = frame.assign(_score=score).sort_values(["_score", "id"], ascending=[False, True], na_position="last",
                                                     kind="mergesort")
    top = ordered.head(limit).assign(_group="top")
    rest = ordered.iloc[limit:]
    picks = min(extra, len(rest))
    if picks == 0:
        return top
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(rest)), min(_STRATA, picks))
    quotas = [len(q) for q in np.array_split(np.arange(picks), len(strata))]
    chosen = np.concatenate([rng.choice(stratum, size=quota, replace=False)
                             for stratum, quota in zip(strata, quotas)])
    sample = rest.iloc[np.sort(chosen)].assign(_group="sample")
    return pd.concat([top, sample])


def _thumbnail(members: dict[str, bytes]) -> bytes | None:
    """A PNG thumbnail (longer side <= 192 px) of a sample's image, or a video clip's first frame."""
    try:
        if "png" in members:
            image = Image.open(io.BytesIO(members["png"]))
            image.load()
        elif "mp4" in members:
            import av

            with av.open(io.BytesIO(members["mp4"])) as container:
                image = next(container.decode(video=0)).to_image()
        else:
            return None
    except Exception:  # a broken member must not stop the export; the card says so
        return None
    image = image.convert("RGB")
    if max(image.size) > _THUMBNAIL_SIDE:
        image.thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _thumbnails(dataset_dir: Path, candidates: pd.DataFrame, split: str) -> dict[str, bytes | None]:
    wanted = set(candidates["id"].astype(str))
    if "shard" in candidates.columns:
        shards = [Path(dataset_dir) / name for name in sorted(candidates["shard"].dropna().astype(str).unique())]
    else:
        shards = shard_paths(dataset_dir, split)
    found: dict[str, bytes | None] = {}
    for shard in shards:
        if not shard.is_file():
            raise NotACuratedDatasetError(f"{shard} is listed in {MANIFEST} but missing from {dataset_dir}")
        for sample in iter_shard(shard):
            if sample.key in wanted:
                found[sample.key] = _thumbnail(sample.members)
        if len(found) == len(wanted):
            break
    return found


def _format_score(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.4g}"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .3em}p{max-width:70em}code{background:#eee;padding:0 3px}
.controls{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.controls button{margin:2px;padding:3px 8px;border:1px solid #bbb;border-radius:4px;background:#fff;cursor:pointer}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin:.5em 0 1.5em}
.card{width:200px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}
.card img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}
.card .id{font-family:monospace;font-size:11px;word-break:break-all;color:#555}
.card .caption{margin:3px 0;max-height:4.5em;overflow:auto}
.card table{border-collapse:collapse}.card td{padding:0 6px 0 0}
.card.sample{border-color:#c9a}.badge{font-size:10px;padding:0 4px;border-radius:3px;background:#dde}
.card.sample .badge{background:#f3dde6}.missing{width:192px;height:192px;background:#eee;color:#999;
display:flex;align-items:center;justify-content:center}
"""

_SCRIPT = """
function sortCards(key, descending){
  document.querySelectorAll('.grid').forEach(function(grid){
    var cards = Array.prototype.slice.call(grid.children);
    cards.sort(function(a, b){
      var x = a.dataset[key], y = b.dataset[key];
      if (key !== 'id') { x = x === '' ? -Infinity : parseFloat(x); y = y === '' ? -Infinity : parseFloat(y); }
      if (x < y) return descending ? 1 : -1;
      if (x > y) return descending ? -1 : 1;
      return a.dataset.id < b.dataset.id ? -1 : 1;
    });
    cards.forEach(function(card){ grid.appendChild(card); });
  });
}
"""


def _card(row: dict[str, Any], thumbnail: bytes | None, scores: list[str]) -> str:
    sample_id = str(row["id"])
    caption = "" if row.get("caption") is None or pd.isna(row.get("caption")) else str(row["caption"])
    if thumbnail is not None:
        picture = (f"<img src='data:image/png;base64,{base64.b64encode(thumbnail).decode()}' "
                   f"alt='{html.escape(sample_id, quote=True)}' loading='lazy'>")
    else:
        picture = f"<img class='missing' alt='no image for {html.escape(sample_id, quote=True)}'>"
    data = " ".join(f"data-{column.replace('_', '-')}='{_format_score(row.get(column))}'" for column in scores)
    rows = "".join(f"<tr><td>{html.escape(column)}</td><td>{_format_score(row.get(column))}</td></tr>"
                   for column in scores)
    group = row["_group"]
    badge = "top" if group == "top" else "sample of the rest"
    return (f"<div class='card {group}' data-id='{html.escape(sample_id, quote=True)}' {data}>{picture}"
            f"<div class='id'>{html.escape(sample_id)}</div><span class='badge'>{badge}</span>"
            f"<div class='caption'>{html.escape(caption)}</div><table>{rows}</table></div>")


def export_review(dataset_dir: Path, out_dir: Path, *, limit: int, sort_by: str = "aesthetic",
                  split: str = "train", extra: int | None = None, seed: int = 0) -> Path:
    """Write `out_dir/index.html` (contact sheet) and `out_dir/candidates.csv` for a review pass.

    Candidates are the top `limit` rows of `split` by `sort_by` (ties by id), plus `extra`
    (default: `limit`) rows drawn at random, in equal numbers, from five equal-size strata of
    the remaining rows ordered by `sort_by`, so the sheet spans the whole score range.
    Returns the path of index.html.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    check_dataset(dataset_dir, need_embeddings=False)
    manifest = _load_manifest(dataset_dir)
    if sort_by not in manifest.columns:
        numeric = sorted(c for c in manifest.columns if pd.api.types.is_numeric_dtype(manifest[c]))
        raise ValueError(f"cannot sort by {sort_by!r}: {dataset_dir / MANIFEST} has no such column "
                         f"(numeric columns: {', '.join(numeric)})")
    if "split" in manifest.columns:
        manifest = manifest[manifest["split"] == split]
    if manifest.empty:
        raise ValueError(f"{dataset_dir / MANIFEST} has no rows in split {split!r}")
    candidates = _pick_candidates(manifest, sort_by, limit, limit if extra is None else extra, seed)
    thumbnails = _thumbnails(dataset_dir, candidates, split)
    scores = [sort_by] + [c for c in _SHOWN_SCORES if c in candidates.columns and c != sort_by]

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "candidates.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CANDIDATES_COLUMNS)
        for row in candidates.to_dict("records"):
            caption = "" if row.get("caption") is None or pd.isna(row.get("caption")) else str(row["caption"])
            writer.writerow([row["id"], caption, _format_score(row.get("aesthetic")),
                             _format_score(row.get("quality")), "", ""])

    records = candidates.to_dict("records")
    top_cards = "".join(_card(r, thumbnails.get(str(r["id"])), scores) for r in records if r["_group"] == "top")
    sample_cards = "".join(_card(r, thumbnails.get(str(r["id"])), scores) for r in records if r["_group"] != "top")
    n_top = sum(r["_group"] == "top" for r in records)
    buttons = "".join(
        f"<button onclick=\"sortCards('{_dataset_key(c)}', true)\">"
        f"{html.escape(c)} &darr;</button>" for c in scores)
    buttons += "<button onclick=\"sortCards('id', false)\">id &uarr;</button>"
    title = f"reelforge review: {html.escape(dataset_dir.name)}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>
<h1>Review candidates</h1>
<p>Dataset <code>{html.escape(str(dataset_dir))}</code>, split <b>{html.escape(split)}</b>:
{n_top} top samples by <b>{html.escape(sort_by)}</b>, then {len(records) - n_top} drawn at random from the rest
across its whole {html.escape(sort_by)} range, so you see weak samples too.</p>
<p>Fill the <code>label</code> column of <code>candidates.csv</code> (next to this page) with <b>accept</b> or
<b>reject</b> (or 1 / 0; leave blank to skip; notes are kept). Editing it in a spreadsheet is fine: save as CSV.
Then run <code>reelforge review import --labels candidates.csv --dataset {html.escape(str(dataset_dir))}
--out REVIEW_DIR</code>
and curate with <code>--set curate.aesthetic.review_dir=REVIEW_DIR</code>.</p>
<div class="controls">sort by: {buttons}</div>
<h2>Top {n_top} by {html.escape(sort_by)}</h2><div class="grid">{top_cards}</div>
<h2>Sample of the rest ({len(records) - n_top})</h2><div class="grid">{sample_cards}</div>
</body></html>"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _dataset_key(column: str) -> str:
    """The JS `dataset` key of a `data-<column>` attribute (text_area -> data-text-area -> textArea)."""
    head, *rest = column.split("_")
    return head + "".join(part.capitalize() for part in rest)


# ---------------------------------------------------------------------------------------------
# Import


def read_review_csv(csv_path: Path, known_ids: set[str]) -> tuple[pd.DataFrame, int]:
    """Validated labels from a reviewer's CSV: (frame of id, label, notes; number of blank rows).

    Every problem is collected and raised together as a :class:`ReviewError` naming the row
    (spreadsheet numbering: the header is row 1) and the offending value.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ReviewError(f"review labels {csv_path} do not exist")
    with csv_path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ReviewError(f"{csv_path} is empty: expected a header with at least id,label")
        columns = [name.strip().lower() for name in header]
        missing = [name for name in ("id", "label") if name not in columns]
        if missing:
            raise ReviewError(f"{csv_path}: header has no {' or '.join(missing)} column "
                              f"(found {', '.join(header)}); export one with `reelforge review export`")
        id_at, label_at = columns.index("id"), columns.index("label")
        notes_at = columns.index("notes") if "notes" in columns else None
        rows: dict[str, dict[str, str]] = {}
        errors: list[str] = []
        blank = 0
        for number, fields in enumerate(reader, start=2):
            def field(at: int | None) -> str:
                return fields[at].strip() if at is not None and at < len(fields) else ""

            sample_id, raw_label = field(id_at), field(label_at)
            if not raw_label:
                blank += 1 if sample_id else 0
                continue
            label = _LABEL_VALUES.get(raw_label.lower())
            if label is None:
                errors.append(f"row {number}: label {raw_label!r} is not accept, reject, 1 or 0 (leave blank to skip)")
                continue
            if not sample_id:
                errors.append(f"row {number}: label {raw_label!r} has no id")
                continue
            if sample_id not in known_ids:
                errors.append(f"row {number}: id {sample_id!r} is not in this dataset's manifest")
                continue
            # A later row for the same id wins, like a later import.
            rows[sample_id] = {"id": sample_id, "label": label, "notes": field(notes_at)}
    if errors:
        shown = "\n  ".join(errors[:_MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - _MAX_ERRORS_SHOWN} more" if len(errors) > _MAX_ERRORS_SHOWN else ""
        raise ReviewError(f"{csv_path}: {len(errors)} bad row(s); nothing was imported:\n  {shown}{more}")
    frame = pd.DataFrame(list(rows.values()), columns=["id", "label", "notes"])
    return frame, blank


def import_review(csv_path: Path, dataset_dir: Path, review_dir: Path) -> ReviewResult:
    """Import a reviewer's CSV into `review_dir`: merged labels plus a head trained on them.

    Labels from earlier imports into the same `review_dir` are kept; for an id labelled
    again, the new label (and notes) win. The head trains on every merged label whose sample
    is in `dataset_dir` (row i of embeddings.npy belongs to manifest row i). With fewer than
    2 accepts or 2 rejects the labels are still saved and a :class:`ReviewError` says how
    many more are needed.
    """
    dataset_dir, review_dir = Path(dataset_dir), Path(review_dir)
    check_dataset(dataset_dir, need_embeddings=True)
    manifest = _load_manifest(dataset_dir)
    embeddings = load_embeddings(dataset_dir, manifest)
    ids = manifest["id"].astype(str).tolist()
    new_labels, blank = read_review_csv(csv_path, set(ids))

    labels_path = review_dir / LABELS_FILE
    if labels_path.is_file():
        previous = pd.read_parquet(labels_path)
        if not {"id", "label"} <= set(previous.columns):
            raise ReviewError(f"{labels_path} is not a reelforge labels file (columns {list(previous.columns)})")
        previous = previous.reindex(columns=["id", "label", "notes"]).fillna({"notes": ""})
        merged = pd.concat([previous[~previous["id"].isin(new_labels["id"])], new_labels])
    else:
        merged = new_labels
    merged = merged.sort_values("id", kind="mergesort").reset_index(drop=True)
    review_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(merged, review_dir, LABELS_FILE)

    row_of = {sample_id: row for row, sample_id in enumerate(ids)}
    present = merged[merged["id"].isin(row_of)]
    features = embeddings[[row_of[i] for i in present["id"]]]
    targets = (present["label"] == "accept").to_numpy(dtype=np.int64)
    try:
        head = AestheticHead().fit(features, targets)
    except ValueError as error:
        raise ReviewError(f"{len(merged)} labels saved to {labels_path} (they merge with the next import), "
                          f"but no head was trained: {error}") from error
    head.metadata["dataset"] = str(dataset_dir)
    head_path = head.save(review_dir / HEAD_FILE)
    return ReviewResult(
        review_dir=review_dir,
        labels_path=labels_path,
        head_path=head_path,
        rows_labelled=len(new_labels),
        rows_blank=blank,
        n_labels=len(merged),
        n_accept=int((merged["label"] == "accept").sum()),
        n_reject=int((merged["label"] == "reject").sum()),
        n_trained=len(present),
        train_accuracy=float(head.metadata["train_accuracy"]),
        cv_accuracy=head.metadata["cv_accuracy"],
    )

