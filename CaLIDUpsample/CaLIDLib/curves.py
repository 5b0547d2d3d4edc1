"""Training curves in the scene: a table node (step, loss, val_psnr_model, val_psnr_linear) and its plots.

Loss (about 0.01 to 1) and PSNR (about 20 to 40 dB) do not share a scale, so they get a chart each, both
drawn from the one table. A row is one step: a training log row and a validation row of the same step
fill the same row, the other columns stay NaN. A resumed run reports again the steps after its last
checkpoint, so a step earlier than the last row drops the rows after it before it is written.
"""

from __future__ import annotations

import math

import vtk

STEP = "step"
VALUES = ("loss", "val_psnr_model", "val_psnr_linear")
SERIES = {"loss": "loss", "val_psnr_model": "PSNR CaLID", "val_psnr_linear": "PSNR linear interpolation"}
"""Column -> legend label."""


def _node(scene, class_name: str, name: str):
    """The node of that class and name, created when the scene has none (a resumed run reuses its curves)."""
    found = scene.GetNodesByClassByName(class_name, name)
    return found.GetItemAsObject(0) if found.GetNumberOfItems() else scene.AddNewNodeByClass(class_name, name)


class TrainingCurves:
    def __init__(self, scene, name: str):
        self.table = _node(scene, "vtkMRMLTableNode", f"{name} training curves")
        if self.table.GetTable().GetColumnByName(STEP) is None:
            for column, array_class in ((STEP, vtk.vtkIntArray), *((v, vtk.vtkDoubleArray) for v in VALUES)):
                array = array_class()
                array.SetName(column)
                self.table.AddColumn(array)
        self.lossChart = self._chart(scene, f"{name} training loss", "loss", ["loss"])
        self.psnrChart = self._chart(scene, f"{name} validation PSNR", "PSNR (dB)",
                                     ["val_psnr_model", "val_psnr_linear"])

    def _chart(self, scene, title: str, y_title: str, columns: list[str]):
        chart = _node(scene, "vtkMRMLPlotChartNode", title)
        chart.SetTitle(title)
        chart.SetXAxisTitle(STEP)
        chart.SetYAxisTitle(y_title)
        for column in columns:
            series = _node(scene, "vtkMRMLPlotSeriesNode", f"{self.table.GetName()}: {SERIES[column]}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName(STEP)
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            # Validation rows are sparse (NaN between them): markers keep every point visible.
            series.SetMarkerStyle(series.MarkerStyleNone if column == "loss" else series.MarkerStyleCircle)
            if not chart.HasPlotSeriesNodeID(series.GetID()):
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart

    def rows(self) -> dict[int, dict[str, float]]:
        table = self.table.GetTable()
        steps = table.GetColumnByName(STEP)
        values = {v: table.GetColumnByName(v) for v in VALUES}
        return {steps.GetValue(i): {v: values[v].GetValue(i) for v in VALUES} for i in range(table.GetNumberOfRows())}

    def add(self, metrics: dict) -> None:
        """One ``metrics`` event of ``calid train`` (a training log row or a validation row)."""
        step = int(metrics[STEP])
        rows = {s: r for s, r in self.rows().items() if s <= step}
        row = rows.setdefault(step, dict.fromkeys(VALUES, math.nan))
        row.update({v: float(metrics[v]) for v in VALUES if metrics.get(v) is not None})
        self._write(rows)

    def clear(self) -> None:
        self._write({})

    def remove(self) -> None:
        """Take the table, both charts and their series out of the scene (those still in it: a closed scene or
        the Data module may have taken them already)."""
        nodes = [chart.GetNthPlotSeriesNode(index) for chart in (self.lossChart, self.psnrChart)
                 for index in range(chart.GetNumberOfPlotSeriesNodes())]
        for node in (*nodes, self.lossChart, self.psnrChart, self.table):
            scene = node.GetScene() if node is not None else None
            if scene is not None:
                scene.RemoveNode(node)

    def _write(self, rows: dict[int, dict[str, float]]) -> None:
        table = self.table.GetTable()
        steps = sorted(rows)
        for column in (STEP, *VALUES):
            array = table.GetColumnByName(column)
            array.SetNumberOfTuples(len(steps))
            for i, step in enumerate(steps):
                array.SetValue(i, step if column == STEP else rows[step][column])
            array.Modified()
        table.Modified()
        self.table.Modified()
