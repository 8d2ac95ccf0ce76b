"""Prompt sets: fixed prompts with categories, so every model is judged on the same test.

- Committed sets: ``components/evaluate/prompts/<name>.jsonl`` (``demo``: prompts written for
  the demo data, with the categories the alignment and category metrics need), or any JSONL path.
- ``vbench``: the 946 prompts of the VBench benchmark as the ``vbench`` package ships them
  (``VBench_full_info.json``: ``prompt_en`` and the list of evaluation dimensions each prompt
  serves). A prompt's category is its first dimension; all of them are kept in
  :attr:`Prompt.dimensions`. The package is read as data only: importing ``vbench`` pulls in
  decord and video models, so its file is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

VBENCH = "vbench"
VBENCH_INFO_FILE = "VBench_full_info.json"
VBENCH_INSTALL = "pip install --no-deps vbench==0.1.5"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt, the category it belongs to, and (VBench) every dimension it serves."""

    text: str
    category: str
    dimensions: tuple[str, ...] = ()


def load_prompts(name_or_path: str, limit: int | None = None) -> list[Prompt]:
    """Load a prompt set: ``vbench``, `components/evaluate/prompts/<name>.jsonl`, or a JSONL path.

    `limit` keeps an even spread (for VBench: spread over its dimensions, see :func:`load_vbench`).
    """
    if name_or_path == VBENCH:
        return load_vbench(limit)
    path = Path(name_or_path)
    if not path.is_file():
        packaged = resources.files("components.evaluate") / "prompts" / f"{name_or_path}.jsonl"
        if not packaged.is_file():
            raise FileNotFoundError(f"prompt set {name_or_path!r} not found (neither a file, a packaged set "
                                    f"nor {VBENCH!r})")
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


def vbench_info_path() -> Path:
    """Where the installed ``vbench`` package keeps ``VBench_full_info.json`` (without importing it)."""
    spec = importlib.util.find_spec(VBENCH)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"prompt set {VBENCH!r} needs the vbench package's prompt list: {VBENCH_INSTALL} "
                                "(--no-deps: only its data is used)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / VBENCH_INFO_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the installed vbench package has no {VBENCH_INFO_FILE}; reinstall it: {VBENCH_INSTALL}")


def load_vbench(limit: int | None = None, path: Path | None = None) -> list[Prompt]:
    """The VBench prompts (category = first dimension), or `limit` of them spread over the categories.

    With a limit, every category gets ``limit // categories`` prompts (the first ones in file
    order get one more for the remainder), each category's evenly spaced through it, so a
    32-prompt demo still covers all 11 dimension families.
    """
    path = path or vbench_info_path()
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    prompts = []
    for index, row in enumerate(rows):
        dimensions = row.get("dimension") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt_en"), str) or not dimensions:
            raise ValueError(f"{path}: entry {index} needs 'prompt_en' (text) and a non-empty 'dimension' list")
        prompts.append(Prompt(row["prompt_en"], str(dimensions[0]), tuple(str(d) for d in dimensions)))
    return stratified(prompts, limit) if limit else prompts


def stratified(prompts: list[Prompt], count: int) -> list[Prompt]:
    """`count` prompts spread over the categories (in order of first appearance), then within each."""
    if count >= len(prompts):
        return list(prompts)
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    base, extra = divmod(count, len(by_category))
    chosen = []
    for rank, members in enumerate(by_category.values()):
        chosen += spread(members, base + (rank < extra))
    return chosen


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced through `items` (so a short list still covers every category)."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]
