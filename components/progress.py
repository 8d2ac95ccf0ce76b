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


class ProgressCounter:
    """A progress display advanced by hand (for work that reports back in chunks, e.g. a worker pool).

    Interactive terminals get a rich bar; logs (KFP, CI) get a line every ~5 s with the rate.
    """

    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total, self.count = description, total, 0
        self._start = self._last = time.monotonic()
        self._rich = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._rich = Progress(transient=True)
            self._rich.start()
            self._task = self._rich.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        """Count `n` more items done."""
        self.count += n
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
            return
        now = time.monotonic()
        if now - self._last >= 5.0 or (self.total and self.count >= self.total):
            self._last = now
            of_total = f"/{self.total}" if self.total else ""
            rate = self.count / max(now - self._start, 1e-9)
            print(f"[{self.description}] {self.count}{of_total} ({rate:.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the display."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
