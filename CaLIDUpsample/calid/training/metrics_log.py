"""Metrics of a training run, appended as they come: ``metrics.csv`` for spreadsheets, ``metrics.jsonl`` for code.

Both trainers (interpolation and segmentation) log through here, so a run folder always has the same two files
and an interrupted run continues them from its checkpoint (``forget_after``).
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


def forget_after(folder: Path, step: int) -> None:
    """Drop the rows logged after ``step``: a run resumed from its checkpoint at ``step`` logs those steps again,
    and both files held them twice."""
    jsonl = folder / "metrics.jsonl"
    if jsonl.is_file():
        lines = [line for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        jsonl.write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= step),
                         encoding="utf-8")
    table = folder / "metrics.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if float(row.get("step") or 0) <= step]
            fields = reader.fieldnames or []
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
