"""Progress reporting for long work: a tqdm bar where someone watches (a terminal, a notebook), plain lines
where nobody does (a batch job's log, nohup, a pipe), instead of tqdm's carriage-return updates piling up
in the log or nothing at all.

Every long loop asks ``progress_bar(..., progress=...)``, where ``progress`` is the user's setting:
- False: silent.
- True: always reported: a bar, or without a terminal a line every LOG_INTERVAL_S seconds and one at the end.
- None (the API default): a bar on a terminal; without one, lines only for work that outlasts
  LOG_INTERVAL_S (a short call stays quiet in a script's output).
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


def progress_bar(iterable: Iterable | None = None, *, progress: bool | None, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True, unit_scale: bool = False):
    """A tqdm bar, or a ``ProgressLines`` with the same interface (iterate, update, set_postfix, close, with)."""
    if progress is False:
        return tqdm(iterable, total=total, disable=True)
    if _watched():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, unit_scale=unit_scale)
    # A bar that disappears when done (leave=False: an inner loop) leaves no closing line either.
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                         closing_line=progress is True and leave)


def _watched() -> bool:
    """A terminal on stderr, or a Jupyter kernel (whose stderr is no terminal but shows bars)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class ProgressLines:
    """tqdm's interface, printing to stderr a line every LOG_INTERVAL_S seconds, and at the end when asked to
    or when it printed before: ``train 1200/78150 (1.5%)  3.1 step/s  0:06:27 elapsed  6:58:12 left  loss 5.7012``.
    The speed is over the last interval; the time left, over everything since the start."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int,
                 unit_scale: bool, closing_line: bool):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc, unit, unit_scale
        self.n = self.first_n = self.printed_n = initial
        self.started = self.printed_at = time.monotonic()
        self.postfix: dict = {}
        self.closing_line, self.printed, self.closed = closing_line, False, False

    # Work that fails or is interrupted ends without a closing line: its one-line error is the last word.
    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        self.closed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.printed_at >= LOG_INTERVAL_S:
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if (self.closing_line or self.printed) and (self.n != self.printed_n or not self.printed):
            self._print()

    def _print(self) -> None:
        now = time.monotonic()
        speed = (self.n - self.printed_n) / max(now - self.printed_at, 1e-9)
        parts = [f"{self.desc} {self._amount(self.n)}" + (f"/{self._amount(self.total)}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.1f}%)"
        parts.append(f"{self._amount(speed, speed=True)} {self.unit}/s" if not self.unit_scale
                     else f"{self._amount(speed)}/s")
        elapsed = now - self.started
        parts.append(f"{datetime.timedelta(seconds=round(elapsed))} elapsed")
        if self.total and self.first_n < self.n < self.total:
            left = elapsed / (self.n - self.first_n) * max(self.total - self.n, 0)
            parts.append(f"{datetime.timedelta(seconds=round(left))} left")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        print("  ".join(parts), file=sys.stderr, flush=True)
        self.printed, self.printed_at, self.printed_n = True, now, self.n

    def _amount(self, x: float, speed: bool = False) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(x, self.unit)
        if not speed:
            return str(int(x))
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"
