"""How far a long job is: a progress bar on a terminal, log lines elsewhere.

Lightning's progress bar covers the training and evaluation loops; the jobs around them (the exact pass
before an evaluation, converting a dataset into a store) take minutes to an hour on ogbn-papers100M and would
otherwise print nothing. :class:`Progress` reports them the same way: with ``bar=True`` a ``tqdm`` bar (the
library Lightning's own bar uses), otherwise a line through ``report`` when a stage starts, every
``interval`` seconds and at the end: the stage, how much of it is done, the rate and the time left.
"""
import math
import sys
import time
from typing import Callable, Optional


class Progress:
    """Progress of a job made of stages. ``begin(total, unit)`` gives the whole job's size in ``unit`` (or
    ``None`` when unknown: then each stage's own total is used for the share done and the time left),
    ``stage(name, total, unit)`` starts a stage of ``total`` steps, ``advance(steps, amount)`` records
    ``steps`` of the stage and ``amount`` of the job's unit (``steps`` by default), ``end()`` says how long
    it took. ``bar=None`` chooses a bar when standard error is a terminal."""

    def __init__(self, description: str, report: Callable[[str], None] = print, bar: Optional[bool] = None,
                 interval: float = 30.0) -> None:
        self.description, self.report, self.interval = description, report, interval
        self.bar = sys.stderr.isatty() if bar is None else bar
        self._tqdm = None
        self.total: Optional[float] = None
        self.unit = ""
        self.done = 0.0
        self.started = self._last = time.perf_counter()
        self.stage_name, self.stage_total, self.stage_unit, self.stage_done = "", None, "", 0
        self.stage_started = self.started

    def begin(self, total: Optional[float] = None, unit: str = "", message: Optional[str] = None) -> None:
        self.total, self.unit, self.done = total, unit, 0.0
        self.started = self._last = time.perf_counter()
        if self.bar:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=total, unit=unit or "it", unit_scale=True, desc=self.description, leave=False,
                              dynamic_ncols=True, file=sys.stderr)
        elif message is not None:
            self.report(f"{self.description}: {message}")

    def stage(self, name: str, total: Optional[int] = None, unit: str = "") -> None:
        self.stage_name, self.stage_total, self.stage_unit, self.stage_done = name, total, unit, 0
        self.stage_started = time.perf_counter()
        if self._tqdm is not None:
            self._tqdm.set_description(f"{self.description}: {name}")
            if self.total is None:  # the bar follows the stage
                self._tqdm.reset(total=total)

    def advance(self, steps: int = 1, amount: Optional[float] = None) -> None:
        amount = steps if amount is None else amount
        self.stage_done += steps
        self.done += amount
        if self._tqdm is not None:
            self._tqdm.update(amount if self.total is not None else steps)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self.report(self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        """``"<description>: <stage>, 612/1,389 chunks; 41,250 nodes/s, 57% done, about 4 min left"``."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            share, left = self.done / self.total, (self.total - self.done) / rate if rate > 0 else math.inf
        elif self.stage_total:
            share = self.stage_done / self.stage_total
            stage_rate = self.stage_done / max(now - self.stage_started, 1e-9)
            left = (self.stage_total - self.stage_done) / stage_rate if stage_rate > 0 else math.inf
        else:
            share, left = None, None
        count = f"{self.stage_done:,}" + (f"/{self.stage_total:,}" if self.stage_total else "")
        text = f"{self.description}: {self.stage_name}, {count} {self.stage_unit}".rstrip() + \
            f"; {rate:,.0f} {self.unit or self.stage_unit}/s"
        if share is not None:
            text += f", {100 * share:.0f}% done, about {duration(left)} left"
        return text

    def end(self) -> None:
        seconds = time.perf_counter() - self.started
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        else:
            self.report(f"{self.description}: done in {duration(seconds)}")


def duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"``, ``"1.5 h"``, or ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
