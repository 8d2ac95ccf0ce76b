"""The curation report: `report.json` for machines, `report.html` for people.

The HTML is self-contained (inline CSS, SVG and data-URI thumbnails, so it opens offline and
as an MLflow artifact). It shows the funnel (samples left after each step), counts per reason
code, a histogram of every score with its threshold, a grid of what each filter removed, a
grid of accepted samples per bucket, and a table of every removed sample with its detail.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.media import REASON_DESCRIPTIONS, RejectReason

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}
.bar{background:#4a7;height:12px}.grid img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;margin:2px;background:#eee}
.grid figure{display:inline-block;margin:2px;width:72px;font-size:9px;vertical-align:top;overflow:hidden}
.hist{display:inline-block;margin:0 1em 1em 0;font-size:12px}.muted{color:#777}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""
# Score columns with a histogram, and the curate.filters key of their threshold.
_SCORES = {
    "quality": "min_quality", "sharpness": "min_sharpness", "clipped": "max_clipped", "brisque": "max_brisque",
    "text_area": "max_text_area", "unsafe": "max_unsafe", "alignment": "min_alignment", "aesthetic": "min_aesthetic",
    "motion": None, "jitter": None,
}


def _funnel_rows(funnel: dict[str, int]) -> str:
    total = max(funnel.get("samples", funnel.get("input", 0)), 1)
    rows, previous = [], None
    for step, count in funnel.items():
        dropped = "" if previous is None or step == "samples" else (f"-{previous - count}" if previous != count else "")
        width = int(300 * count / total)
        rows.append(f"<tr><td>{html.escape(step)}</td><td>{count}</td><td>{dropped}</td>"
                    f"<td><div class='bar' style='width:{width}px'></div></td></tr>")
        previous = count
    return "".join(rows)


def _reason_rows(reasons: dict[str, int]) -> str:
    rows = []
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        description = REASON_DESCRIPTIONS.get(RejectReason(reason), "")
        rows.append(f"<tr><td><code>{html.escape(reason)}</code></td><td>{count}</td><td>{html.escape(description)}</td></tr>")
    return "".join(rows)


def _histogram(name: str, values: np.ndarray, threshold: float | None, filter_on: bool) -> str:
    """A 30-bin SVG histogram, with the threshold as a red line when the filter is on."""
    values = values[np.isfinite(values)]
    if not len(values):
        return ""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=30, range=(lo, hi))
    width, height = 240, 80
    peak = max(int(counts.max()), 1)
    bars = "".join(
        f"<rect x='{i * width / 30:.1f}' y='{height - c / peak * height:.1f}' width='{width / 30 - 1:.1f}' "
        f"height='{c / peak * height:.1f}' fill='#58a'/>" for i, c in enumerate(counts))
    line = ""
    if threshold is not None and filter_on and lo <= threshold <= hi:
        x = (threshold - lo) / (hi - lo) * width
        line = f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{height}' stroke='#d33' stroke-width='2'/>"
    label = f"threshold {threshold}" if filter_on else "filter off (score only)"
    return (f"<div class='hist'><b>{html.escape(name)}</b> <span class='muted'>{label}; n={len(values)}</span><br>"
            f"<svg width='{width}' height='{height + 14}'>{bars}{line}"
            f"<text x='0' y='{height + 12}' font-size='10'>{lo:.3g}</text>"
            f"<text x='{width - 40}' y='{height + 12}' font-size='10'>{hi:.3g}</text></svg></div>")


def _histograms(manifest: pd.DataFrame, rejects: pd.DataFrame, summary: dict[str, Any]) -> str:
    parts = []
    frames = [f for f in (manifest, rejects) if len(f)]
    for column in _SCORES:
        series = [f[column] for f in frames if column in f]
        if not series:
            continue
        values = pd.to_numeric(pd.concat(series), errors="coerce").to_numpy(dtype=float)
        stats = summary.get("scores", {}).get(column, {})
        parts.append(_histogram(column, values, stats.get("threshold"), bool(stats.get("filter_on"))))
    return "".join(parts)


def _figure(sample_id: str, png: bytes | None, caption: str) -> str:
    image = (f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' title='{html.escape(caption)}'>"
             if png else "<div style='width:64px;height:64px;background:#ddd'></div>")
    return f"<figure>{image}<figcaption>{html.escape(caption[:60])}</figcaption></figure>"


def _rejected_grids(rejects: pd.DataFrame, thumbnails: dict[str, bytes], per_reason: int = 24) -> str:
    if not len(rejects):
        return "<p>Nothing was removed.</p>"
    parts = []
    for reason, group in rejects.groupby("reason", sort=True):
        figures = [_figure(r["id"], thumbnails.get(r["id"]), str(r.get("detail") or ""))
                   for r in group.head(per_reason).to_dict("records")]
        parts.append(f"<details><summary><code>{html.escape(str(reason))}</code>: {len(group)} removed</summary>"
                     f"<div class='grid'>{''.join(figures)}</div></details>")
    return "".join(parts)


def _accepted_grids(manifest: pd.DataFrame, thumbnails: dict[str, bytes], per_bucket: int = 48) -> str:
    if not len(manifest):
        return ""
    parts = []
    for (media, bucket), group in manifest.groupby(["media", "bucket"], sort=True):
        figures = [_figure(r["id"], thumbnails.get(r["id"]), str(r.get("caption") or ""))
                   for r in group.head(per_bucket).to_dict("records")]
        parts.append(f"<h3>{html.escape(str(media))} {html.escape(str(bucket))}: {len(group)}</h3><div class='grid'>{''.join(figures)}</div>")
    return "".join(parts)


def _removed_rows(rejects: pd.DataFrame, limit: int = 500) -> str:
    rows = []
    for record in rejects.head(limit).to_dict("records"):
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(record.get(k) if record.get(k) is not None else ''))}</td>"
                                     for k in ("id", "status", "step", "reason", "detail", "caption")) + "</tr>")
    return "".join(rows)


def write_report(directory: Path, summary: dict[str, Any], manifest: pd.DataFrame, rejects: pd.DataFrame,
                 thumbnails: dict[str, bytes] | None = None) -> None:
    """Write report.json and report.html into the dataset directory."""
    directory = Path(directory)
    thumbnails = thumbnails or {}
    (directory / "report.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    buckets = ", ".join(f"{k}: {v}" for k, v in summary.get("buckets", {}).items())
    captions = ", ".join(f"{k}: {v}" for k, v in summary.get("captions_by_source", {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reelforge curation report</title>
<style>{_STYLE}</style></head><body>
<h1>Curation report</h1>
<p>{summary['input']} input files gave {summary['samples']} samples (videos are cut into clips):
<b>{summary['accepted']} accepted</b> ({summary['train']} train, {summary['val']} val; {summary.get('images', 0)} images,
{summary.get('clips', 0)} clips), {summary['rejected']} rejected by filters, {summary['quarantined']} quarantined as broken files.
accepted + rejected + quarantined = samples.</p>
<p>Buckets: {html.escape(buckets)}. Captions by source: {html.escape(captions)}. Concept clusters: {summary.get('clusters', 0)}
(effective after 1/sqrt balancing: {summary.get('balance_effective_clusters', 0):.1f}). Output resolution {summary['resolution']} px.
Content hash <code>{summary['content_hash'][:16]}</code>. Shards resumed from a previous run: {summary.get('resumed_shards', 0)}.</p>
<h2>Funnel</h2><table><tr><th>after step</th><th>samples left</th><th>removed</th><th></th></tr>{_funnel_rows(summary['funnel'])}</table>
<h2>Reasons</h2><table><tr><th>reason code</th><th>samples</th><th>meaning</th></tr>{_reason_rows(summary['reasons'])}</table>
<h2>Scores</h2><p class="muted">Every sample that reached scoring, accepted and removed; red line = the recipe's threshold.</p>
{_histograms(manifest, rejects, summary)}
<h2>What each filter removed</h2>{_rejected_grids(rejects, thumbnails)}
<h2>Accepted samples by bucket</h2>{_accepted_grids(manifest, thumbnails)}
<h2>Removed samples</h2><table><tr><th>id</th><th>status</th><th>step</th><th>reason</th><th>detail</th><th>caption</th></tr>{_removed_rows(rejects)}</table>
</body></html>"""
    (directory / "report.html").write_text(page, encoding="utf-8")
