"""Progress of long work on stderr: tensors, bytes, rate and ETA.

On a terminal the line refreshes in place; in a log (a Ray job's output, CI) a line is printed every few
seconds, so `ray job logs` shows how far a merge is.
"""

from __future__ import annotations

import sys
import time

from .config import format_bytes


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, label: str, total_items: int, total_bytes: int, unit: str = "tensors", quiet: bool = False,
                 stream=None, log_interval: float = 10.0):
        self.label, self.unit = label, unit
        self.total_items, self.total_bytes = total_items, total_bytes
        self.items = self.bytes = 0
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else log_interval
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = None  # (items, bytes) last printed

    def skip(self, items: int, nbytes: int) -> None:
        """Work already done by an earlier run: not counted in the rate."""
        self.total_items -= items
        self.total_bytes -= nbytes

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval or self.items >= self.total_items:
            self._last = now
            self._print(final=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        remaining = (self.total_bytes - self.bytes) / rate if rate > 0 else float("nan")
        eta = format_seconds(remaining) if remaining == remaining else "?"
        return (f"{self.label}: {self.items}/{self.total_items} {self.unit} | {format_bytes(self.bytes)}/"
                f"{format_bytes(self.total_bytes)} | {format_bytes(rate)}/s | elapsed {format_seconds(elapsed)}"
                f" | ETA {eta}")

    def _print(self, final: bool) -> None:
        if self.quiet or (final and not self.tty and self._shown == (self.items, self.bytes)):
            return
        self._shown = (self.items, self.bytes)
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._print(final=True)
