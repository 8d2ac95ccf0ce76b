"""Model card of an evaluation: what the candidate is, how it was made, and how it compares.

Written next to metrics.json as ``model_card.md`` (sample grids linked as ``grids/<model>.png``)
and ``model_card.html`` (self-contained: grids embedded), from the evaluation summary alone, so
the register stage can attach the same files to the model version it creates. The file names
are a contract (:data:`CARD_MD`, :data:`CARD_HTML`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

CARD_MD = "model_card.md"
CARD_HTML = "model_card.html"
# Metrics in the card's table: (key, label), with a 95% interval where the summary has one.
CARD_METRICS = (
    ("alignment", "alignment (higher is better)"),
    ("aesthetic", "aesthetic (higher is better)"),
    ("category_accuracy", "category accuracy (higher is better)"),
    ("fid", "FID, EfficientNet-Lite0 features (lower is better)"),
    ("kid", "KID, EfficientNet-Lite0 features (lower is better)"),
    ("realism", "realism (higher is better)"),
    ("diversity", "diversity (higher is better)"),
    ("latency_ms", "latency, ms per image in a batch of 8 (lower is better)"),
    ("latency_single_ms", "latency, ms for one image (lower is better)"),
    ("throughput_images_per_s", "throughput, images/s batched (higher is better)"),
    ("steps", "sampling steps"),
    ("guidance", "guidance scale"),
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _metric_cell(values: dict[str, Any], key: str) -> str:
    """`value [low, high]` or `value` or an em dash when the model lacks the metric."""
    if values.get(key) is None:
        return "—"
    low, high = values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high")
    if low is not None and high is not None:
        return f"{_fmt(values[key])} [{_fmt(low, 3)}, {_fmt(high, 3)}]"
    return _fmt(values[key])


def card_sections(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]] | None, str]]:
    """The card's content as (title, paragraphs, table rows with a header row first or None, grid name).

    One structure rendered twice (Markdown and HTML), so both files always say the same thing.
    """
    models = summary["models"]
    gate = summary.get("gate_inputs") or {}
    candidate = gate.get("candidate")
    lineage = summary.get("lineage") or {}
    champion = summary.get("champion") or {}
    context = summary.get("context") or {}
    sections: list[tuple[str, list[str], list[list[str]] | None, str]] = []

    champion_text = (f"current champion: {champion.get('source')}"
                     + (f" (version {champion['version']})" if champion.get("version") else "")
                     if champion.get("status") == "evaluated"
                     else f"no champion to compare with ({champion.get('reason', 'none')})")
    overview = [
        f"Candidate for deployment: **{candidate}**; {champion_text}.",
        f"Main prompt set `{context.get('prompt_set')}` ({context.get('prompts')} prompts, one seed per prompt, "
        "the same for every model). Alignment chance floor "
        f"{_fmt(context.get('alignment_chance_floor'), 3)}, real held-out images "
        f"{_fmt(context.get('alignment_ceiling_real_images'), 3)}.",
        "FID and KID are Frechet and kernel distances to held-out real images in EfficientNet-Lite0 features, "
        "not Inception-FID: compare models within this card, not with published numbers. "
        "`untrained` is a freshly initialised model of the same architecture (decoded noise): the floor.",
    ]
    sections.append(("Overview", overview, None, ""))

    names = list(models)
    table = [["metric", *names]]
    for key, label in CARD_METRICS:
        if any(models[n].get(key) is not None for n in names):
            table.append([label, *(_metric_cell(models[n], key) for n in names)])
    sections.append(("Metrics (95% intervals in brackets)", [], table, ""))

    ab = summary.get("ab") or {}
    if ab:
        rows = [["pair", "win rate", "95% interval", "wins / ties / losses", "n"]]
        for pair, result in ab.items():
            rows.append([pair.replace("_vs_", " vs "), _fmt(result["win_rate"], 3),
                         f"{_fmt(result['ci_low'], 3)} .. {_fmt(result['ci_high'], 3)}",
                         f"{result['wins']} / {result['ties']} / {result['losses']}", str(result["n"])])
        sections.append(("Pairwise A/B", [f"Judge: {summary.get('judge', '')}."], rows, ""))
    else:
        sections.append(("Pairwise A/B", ["No pair of models to compare."], None, ""))

    for set_name, prompt_set in (summary.get("prompt_sets") or {}).items():
        per_model = prompt_set.get("models") or {}
        if not per_model:
            continue
        categories = list(dict.fromkeys(c for values in per_model.values() for c in values.get("categories", {})))
        rows = [["category (aesthetic / diversity)", *per_model]]
        rows.append(["all prompts", *(f"{_metric_cell(v, 'aesthetic')} / {_fmt(v.get('diversity'), 3)}"
                                      for v in per_model.values())])
        for category in categories:
            cells = []
            for values in per_model.values():
                entry = values.get("categories", {}).get(category)
                cells.append("—" if entry is None else
                             f"{_fmt(entry.get('aesthetic'), 3)} / {_fmt(entry.get('diversity'), 3)} (n={entry['n']})")
            rows.append([category, *cells])
        sections.append((f"Prompt set {set_name} ({prompt_set.get('prompts')} prompts)",
                         ["Reference-free metrics only (no real images of these prompts to compare with)."], rows, ""))

    lineage_rows = [["model", "stage", "step", "recipe", "directory"]]
    for name, info in (lineage.get("models") or {}).items():
        lineage_rows.append([name, _fmt(info.get("stage")), _fmt(info.get("step")), _fmt(info.get("recipe")),
                             f"`{info.get('dir', '')}`"])
    notes = [f"Dataset sha256: `{lineage.get('dataset_sha256', 'unknown')}`.",
             f"Git commit: `{lineage.get('git_commit', 'unknown')}`."]
    if lineage.get("pipeline_run"):
        notes.append(f"Pipeline run: `{lineage['pipeline_run']}`.")
    student = ((lineage.get("models") or {}).get("student") or {}).get("distill")
    if student:
        teachers = student.get("teachers") or []
        described = ", ".join(f"{t.get('source', t) if isinstance(t, dict) else t}"
                              + (f" (weight {_fmt(t.get('weight'), 3)})" if isinstance(t, dict) and "weight" in t else "")
                              for t in teachers) or "not recorded"
        notes.append(f"Student distilled from the teacher ensemble: {described}; "
                     f"{student.get('teacher_steps', '?')} teacher steps -> {student.get('student_steps', '?')} "
                     "student steps, guidance as an input.")
    sections.append(("Lineage", notes, lineage_rows, ""))

    for name in names:
        sections.append((f"Samples: {name}", [], None, name))
    return sections


def _markdown(summary: dict[str, Any], grid_prompts: list[str]) -> str:
    lines = [f"# Model card: {(summary.get('gate_inputs') or {}).get('candidate')}", ""]
    for title, paragraphs, table, grid in card_sections(summary):
        lines += [f"## {title}", ""]
        for paragraph in paragraphs:
            lines += [paragraph, ""]
        if table:
            lines.append("| " + " | ".join(table[0]) + " |")
            lines.append("|" + "---|" * len(table[0]))
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table[1:]]
            lines.append("")
        if grid:
            lines += [f"![{grid} samples](grids/{grid}.png)", ""]
    if grid_prompts:
        lines += ["Grid prompts, left to right and top to bottom: " + "; ".join(grid_prompts), ""]
    return "\n".join(lines)


def _inline_markdown(text: str) -> str:
    """Escape, then render the two inline marks the card uses (**bold**, `code`)."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _html(summary: dict[str, Any], grid_prompts: list[str], grid_images: dict[str, np.ndarray]) -> str:
    from components.evaluate.stage import png_data_uri  # lazy: stage imports this module at run time

    body = [f"<h1>Model card: {html.escape(str((summary.get('gate_inputs') or {}).get('candidate')))}</h1>"]
    for title, paragraphs, table, grid in card_sections(summary):
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [f"<p>{_inline_markdown(p)}</p>" for p in paragraphs]
        if table:
            header = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_markdown(c)}</td>" for c in row) + "</tr>"
                           for row in table[1:])
            body.append(f"<table><tr>{header}</tr>{rows}</table>")
        if grid and grid in grid_images:
            cells = "".join(f"<figure><img src='{png_data_uri(image)}' alt='{html.escape(prompt)}'>"
                            f"<figcaption>{html.escape(prompt)}</figcaption></figure>"
                            for image, prompt in zip(grid_images[grid], grid_prompts, strict=False))
            body.append(f"<div class='grid'>{cells}</div>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>reelforge model card</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:80em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}.grid{{display:flex;flex-wrap:wrap;gap:6px}}figure{{margin:0;width:96px}}
figcaption{{font-size:10px}}img{{width:96px;height:96px;image-rendering:pixelated}}</style></head><body>
{''.join(body)}</body></html>"""


def write_model_card(output_dir: Path, summary: dict[str, Any], grid_prompts: list[str],
                     grid_images: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Write ``model_card.md`` and ``model_card.html`` into `output_dir` from an evaluation summary.

    `grid_images` holds each model's sample grid as uint8 [P,H,W,3] (P = len(grid_prompts)); the
    Markdown links ``grids/<model>.png`` (written by the evaluation), the HTML embeds the images.
    """
    output_dir = Path(output_dir)
    markdown = output_dir / CARD_MD
    page = output_dir / CARD_HTML
    markdown.write_text(_markdown(summary, grid_prompts), encoding="utf-8")
    page.write_text(_html(summary, grid_prompts, grid_images), encoding="utf-8")
    return markdown, page
