"""Progress reporting: a tqdm bar for people, JSON lines for programs (the Slicer worker), or nothing.

JSON mode prints, per update, one JSON object and the Slicer-CLI-style ``<filter-progress>f</filter-progress>``
line (plus ``<filter-comment>`` when the stage changes), each flushed at once so that a reader process sees
them as they happen.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from .choices import PROGRESS_MODES


class Progress:
    """Tracks a fraction in [0, 1] over ``total`` units of work and reports it in the chosen mode."""

    def __init__(self, mode: str = "bar", total: int = 1, description: str = "", stream: TextIO | None = None,
                 subject: str = ""):
        """``description``: the bar's text until the first stage replaces it; ``subject``: what is worked on (an
        input's file name, with its place in a cohort), kept before every stage ("3/40 case.nii.gz: decoding")."""
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {PROGRESS_MODES}")
        self.mode = mode
        self.done = 0
        self.stream = stream or sys.stdout
        self.stage = ""
        self.subject = subject
        self.started = time.monotonic()
        self.reserved = 0
        self._bar = (tqdm(total=total, desc=subject or description, file=sys.stderr, dynamic_ncols=True)
                     if mode == "bar" else None)
        self.total = total

    @property
    def total(self) -> int:
        """All units: those of the stage that set it last, plus the ``reserved`` ones that come after it."""
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._stage_total = int(value)
        self._total = max(self._stage_total + self.reserved, 1)
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def reserve(self, units: int) -> None:
        """Count ``units`` of work that follow the stages which set ``total`` themselves (the generation sets it to
        its own work): segmenting the dense volumes, for one. Without them the fraction reached 1 when the new
        slices were made, and a cine's segmentation then ran for minutes behind a full bar."""
        self.reserved += int(units)
        self.total = self._stage_total

    def expect(self, units: int) -> None:
        """A stage that knows its size says so when it starts: ``units`` more, after whatever the run has done (and
        before the reserved units)."""
        self.total = self.done + units

    def in_parts(self, units: list[int]) -> Iterator[int]:
        """Work made in parts whose stages each ``expect`` their own units (a long cine's phases, made a few at a
        time): the parts not begun yet stay reserved, so the fraction runs once from 0 to 1 over all of them.
        Yields each part's index as it begins."""
        self.reserve(sum(units))
        for index, part_units in enumerate(units):
            self.reserve(-part_units)
            yield index

    def set_stage(self, stage: str) -> None:
        if stage == self.stage:
            return
        self.stage = stage
        if self._bar is not None:
            self._bar.set_description(f"{self.subject}: {stage}" if self.subject else stage)
        elif self.mode == "json":
            self._print(f"<filter-comment>{stage}</filter-comment>")

    def advance(self, units: int = 1, **fields: Any) -> None:
        self.done = min(self.done + units, self.total)
        if self._bar is not None:
            self._bar.update(units)
            if fields:
                self._bar.set_postfix({k: v for k, v in fields.items() if not isinstance(v, (dict, list))})
        elif self.mode == "json":
            fraction = self.done / self.total
            elapsed = time.monotonic() - self.started
            remaining = elapsed / fraction - elapsed if fraction > 0 else None
            self.event("progress", fraction=round(fraction, 4), stage=self.stage, done=self.done, total=self.total,
                       elapsed_s=round(elapsed, 2), remaining_s=None if remaining is None else round(remaining, 1),
                       **fields)
            self._print(f"<filter-progress>{fraction:.4f}</filter-progress>")

    def event(self, name: str, **fields: Any) -> None:
        """A machine-readable event line (JSON mode only)."""
        if self.mode == "json":
            self._print(json.dumps({"event": name, **fields}))

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.mode == "json":
            self.event("log", message=text)

    def warning(self, text: str) -> None:
        """Something the user should know that does not stop the run: a ``warning`` event in JSON mode (the
        Slicer worker's output is read as events), else one ``calid: warning:`` line on stderr."""
        if self.mode == "json":
            self.event("warning", message=text)
        elif self._bar is not None:
            self._bar.write(f"calid: warning: {text}", file=sys.stderr)
        else:
            print(f"calid: warning: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
