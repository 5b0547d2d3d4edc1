"""Clinical measures from label volumes: structure volumes (mL), myocardial mass, ejection fractions, and over a
cardiac cycle (a segmented cine) each ventricle's end-diastolic and end-systolic volume.

Volumes are voxel counts times the voxel volume of the labels' own grid. On a dense CaLID grid the stack
covers first to last acquired slice centre, so it omits half a slice at each end where a Simpson's sum
over the acquired slices counts it; both are reported as computed, nothing is extrapolated.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import CalidError
from .labels import LABELS

KEYS = {1: "rv_cavity_ml", 2: "lv_myocardium_ml", 3: "lv_cavity_ml"}
MYOCARDIUM_DENSITY_G_PER_ML = 1.05


def structure_volumes(labels: sitk.Image) -> dict[str, float]:
    """``rv_cavity_ml``, ``lv_myocardium_ml``, ``lv_cavity_ml`` and ``lv_myocardium_mass_g``."""
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=max(LABELS) + 1)
    volumes = {KEYS[c]: round(float(counts[c]) * voxel_ml, 2) for c in LABELS}
    volumes["lv_myocardium_mass_g"] = round(volumes["lv_myocardium_ml"] * MYOCARDIUM_DENSITY_G_PER_ML, 2)
    return volumes


def ejection_fractions(end_diastole: dict[str, float], end_systole: dict[str, float]) -> dict[str, float]:
    """Stroke volumes (mL) and ejection fractions (%) of both ventricles from ED and ES volumes."""
    out = {}
    for side, key in (("lv", "lv_cavity_ml"), ("rv", "rv_cavity_ml")):
        edv, esv = end_diastole[key], end_systole[key]
        if edv <= 0:
            raise CalidError(f"end-diastolic {side.upper()} cavity volume is 0: cannot compute an ejection fraction")
        if esv > edv:
            raise CalidError(f"end-systolic {side.upper()} volume ({esv} mL) exceeds end-diastolic ({edv} mL): "
                             "are the phases swapped?")
        out[f"{side}_stroke_volume_ml"] = round(edv - esv, 2)
        out[f"{side}_ejection_fraction_percent"] = round(100.0 * (edv - esv) / edv, 1)
    return out


def cycle_volumes(phase_volumes: list[dict[str, float]], times_ms: tuple[float, ...]) -> dict:
    """Every phase's ``structure_volumes`` (with its index and time), and each ventricle's end diastole and end
    systole over the cycle: the phases of its largest and smallest cavity volume, as a reader picks them from a
    cine. The stroke volumes and ejection fractions (``ejection_fractions``) are None when a ventricle is found
    in no phase, which is reported, not raised: the labels are still written."""
    phases = [{"phase": t, "time_ms": times_ms[t], **v} for t, v in enumerate(phase_volumes)]
    out: dict = {"phases": phases}
    ends = {}
    for side, key in (("lv", "lv_cavity_ml"), ("rv", "rv_cavity_ml")):
        cavity = [v[key] for v in phase_volumes]
        ed, es = int(np.argmax(cavity)), int(np.argmin(cavity))
        out[f"{side}_end_diastole_phase"], out[f"{side}_end_systole_phase"] = ed, es
        ends[key] = (cavity[ed], cavity[es])
    found = all(ed > 0 for ed, _ in ends.values())
    out["ejection_fractions"] = ejection_fractions({k: ed for k, (ed, _) in ends.items()},
                                                   {k: es for k, (_, es) in ends.items()}) if found else None
    return out
