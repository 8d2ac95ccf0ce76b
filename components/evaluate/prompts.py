"""Committed prompt sets: fixed prompts with categories, so every model is judged on the same test."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt and the category it belongs to."""

    text: str
    category: str


def load_prompts(name_or_path: str, limit: int | None = None) -> list[Prompt]:
    """Load `components/evaluate/prompts/<name>.jsonl` (or a path); `limit` keeps an even spread."""
    path = Path(name_or_path)
    if not path.is_file():
        packaged = resources.files("components.evaluate") / "prompts" / f"{name_or_path}.jsonl"
        if not packaged.is_file():
            raise FileNotFoundError(f"prompt set {name_or_path!r} not found (neither a file nor a packaged set)")
        path = Path(str(packaged))
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(Prompt(str(row["prompt"]), str(row.get("category", "uncategorized"))))
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": ..., \"category\": ...}} ({error})") from None
    return spread(prompts, limit) if limit else prompts


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced through `items` (so a short list still covers every category)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]
