"""Per-stage progress lines on stderr ("[socc] import ... 1.23 s"), and stage timings for reports."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints one line per stage when it ends, and keeps the timings."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None,
                 on_start: Callable[[str], object] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.on_start = on_start  # told each stage's name as it begins (crash reports name the stage)
        self.seconds: dict[str, float] = {}

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"[socc] {message}", file=self.stream or sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, object]]:
        """Times a stage; the caller may fill the yielded dict with a short summary."""
        summary: dict[str, object] = {}
        if self.on_start is not None:
            self.on_start(name)
        start = time.perf_counter()
        yield summary
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        detail = ", ".join(f"{k}={v}" for k, v in summary.items())
        self.note(f"{name:<16} {elapsed:7.2f} s" + (f"  {detail}" if detail else ""))


SILENT = Progress(enabled=False)
