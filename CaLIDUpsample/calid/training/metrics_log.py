"""Metrics of a training run, appended as they come: ``metrics.csv`` for spreadsheets, ``metrics.jsonl`` for code.

Both trainers (interpolation and segmentation) log through here, so a run folder always has the same two files
and an interrupted run simply continues them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def append_metrics(folder: Path, fields: list[str], row: dict[str, Any]) -> None:
    """One row: the CSV keeps ``fields`` (blank where the row has none), the JSON line keeps the whole row."""
    path = folder / "metrics.csv"
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
