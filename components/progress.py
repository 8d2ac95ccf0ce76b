"""Progress bars for long work: rich on a terminal, periodic plain lines in logs (KFP, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress display; in non-interactive logs print a line every ~5 s."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=description, total=total, transient=True)
        return
    start = last = time.monotonic()
    count = 0
    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= 5.0:
            last = now
            of_total = f"/{total}" if total else ""
            print(f"[{description}] {count}{of_total} ({count / (now - start):.1f}/s)", file=sys.stderr, flush=True)
