"""The curation report: `report.json` for machines, `report.html` for people.

The HTML shows the funnel (samples left after each filter), counts per reason code, every
removed sample with its reason and detail, and a grid of accepted samples, so a user can
judge each filter without opening a notebook.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from components.media import REASON_DESCRIPTIONS, RejectReason

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.bar{background:#4a7;height:12px}.grid img{width:64px;height:64px;image-rendering:pixelated;margin:2px}
.grid figure{display:inline-block;margin:2px;width:72px;font-size:9px;vertical-align:top}
"""


def _funnel_rows(funnel: dict[str, int]) -> str:
    total = max(funnel.get("input", 0), 1)
    rows = []
    previous = None
    for step, count in funnel.items():
        dropped = "" if previous is None else f"-{previous - count}"
        width = int(300 * count / total)
        rows.append(
            f"<tr><td>{html.escape(step)}</td><td>{count}</td><td>{dropped}</td>"
            f"<td><div class='bar' style='width:{width}px'></div></td></tr>"
        )
        previous = count
    return "".join(rows)


def _reason_rows(reasons: dict[str, int]) -> str:
    rows = []
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        description = REASON_DESCRIPTIONS.get(RejectReason(reason), "")
        rows.append(f"<tr><td><code>{html.escape(reason)}</code></td><td>{count}</td><td>{html.escape(description)}</td></tr>")
    return "".join(rows)


def _removed_rows(rejects: pd.DataFrame, limit: int = 500) -> str:
    rows = []
    for record in rejects.head(limit).to_dict("records"):
        rows.append(
            "<tr>" + "".join(
                f"<td>{html.escape(str(record.get(k) or ''))}</td>"
                for k in ("id", "status", "reason", "detail", "caption")
            ) + "</tr>"
        )
    return "".join(rows)


def _accepted_grid(directory: Path, manifest: pd.DataFrame, limit: int = 64) -> str:
    from components.storage import iter_shard

    figures = []
    shards = sorted(manifest["shard"].unique()) if len(manifest) else []
    for shard in shards:
        for sample in iter_shard(directory / shard):
            data = base64.b64encode(sample.members["png"]).decode()
            caption = html.escape(sample.members.get("txt", b"").decode("utf-8", "replace")[:60])
            figures.append(f"<figure><img src='data:image/png;base64,{data}' title='{caption}'><figcaption>{caption}</figcaption></figure>")
            if len(figures) >= limit:
                return "".join(figures)
    return "".join(figures)


def write_report(directory: Path, summary: dict[str, Any], manifest: pd.DataFrame, rejects: pd.DataFrame) -> None:
    """Write report.json and report.html into the dataset directory."""
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>reelforge curation report</title>
<style>{_STYLE}</style></head><body>
<h1>Curation report</h1>
<p>{summary['input']} input samples: <b>{summary['accepted']} accepted</b> ({summary['train']} train, {summary['val']} val),
{summary['rejected']} rejected by filters, {summary['quarantined']} quarantined as broken files.
Output resolution {summary['resolution']} px. Content hash <code>{summary['content_hash'][:16]}</code>.</p>
<h2>Funnel</h2><table><tr><th>after step</th><th>samples left</th><th>removed</th><th></th></tr>{_funnel_rows(summary['funnel'])}</table>
<h2>Reasons</h2><table><tr><th>reason code</th><th>samples</th><th>meaning</th></tr>{_reason_rows(summary['reasons'])}</table>
<h2>Accepted samples (first 64)</h2><div class="grid">{_accepted_grid(directory, manifest)}</div>
<h2>Removed samples</h2><table><tr><th>id</th><th>status</th><th>reason</th><th>detail</th><th>caption</th></tr>{_removed_rows(rejects)}</table>
</body></html>"""
    (directory / "report.html").write_text(page, encoding="utf-8")
