"""Parsing the ``calid --progress json`` output: JSON event lines and Slicer-CLI stage tags.

``calid`` writes each progress step twice, as a JSON ``progress`` event (fraction and estimated seconds left) and
as a Slicer-CLI ``<filter-progress>`` tag (fraction only). Only the JSON event is read: taking both called the
panel's progress callback twice per step, the second time without the time left, which wiped it at once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROGRESS_TAG = ("<filter-progress>", "</filter-progress>")
COMMENT_TAG = ("<filter-comment>", "</filter-comment>")


@dataclass
class WorkerEvent:
    """kind: ``progress`` (fraction, data: remaining_s), ``stage`` (text), ``done`` (data),
    ``metrics`` (data: a training log or validation row), ``ready`` (a standby worker has imported the engine),
    ``log`` (text)."""

    kind: str
    fraction: float | None = None
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _between(line: str, tags: tuple[str, str]) -> str | None:
    if line.startswith(tags[0]) and line.endswith(tags[1]):
        return line[len(tags[0]): -len(tags[1])]
    return None


def parse_line(line: str) -> WorkerEvent | None:
    """One worker output line -> an event; progress tag lines are skipped (the JSON event beside each carries the
    same fraction and the time left)."""
    line = line.strip()
    if not line or _between(line, PROGRESS_TAG) is not None:
        return None
    value = _between(line, COMMENT_TAG)
    if value is not None:
        return WorkerEvent("stage", text=value)
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            return WorkerEvent("log", text=line)
        kind = data.get("event")
        if kind == "progress":
            return WorkerEvent("progress", fraction=data.get("fraction"), data=data)
        if kind in ("done", "metrics", "ready"):
            return WorkerEvent(kind, data=data)
        return WorkerEvent("log", text=data.get("message", line), data=data)
    return WorkerEvent("log", text=line)
