"""Progress of long data work whose total is not known up front (a file read as a stream): a counting bar on a
terminal, else a log line every ``EVERY_S`` seconds, so a log file shows the work moving without a line per chunk."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger(__name__)

EVERY_S = 10.0
"""Seconds between two log lines (no terminal)."""


class Progress:
    """``update(done)`` with the count so far; ``close()`` at the end (the bar goes, a log says nothing more)."""

    def __init__(self, desc: str, unit: str = "records"):
        self.desc, self.unit = desc, unit
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self.bar is None and now - self.last >= EVERY_S:
            self.last = now
            elapsed = now - self.start
            logger.info("%s: %s %s so far, %.0fs elapsed (%s/s)", self.desc, f"{done:,}", self.unit, elapsed,
                        f"{done / max(elapsed, 1e-9):,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
