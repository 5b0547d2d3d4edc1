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
NAMES = {"rv_cavity_ml": "RV cavity", "lv_myocardium_ml": "LV myocardium", "lv_cavity_ml": "LV cavity"}
MYOCARDIUM_DENSITY_G_PER_ML = 1.05
VENTRICLES = (("lv", "lv_cavity_ml"), ("rv", "rv_cavity_ml"))


def structure_volumes(labels: sitk.Image) -> dict[str, float | None]:
    """``rv_cavity_ml``, ``lv_myocardium_ml``, ``lv_cavity_ml`` and ``lv_myocardium_mass_g``.

    A structure with no voxel is None, not 0 mL: a short-axis stack of the heart holds all three, so none found
    means the segmenter failed there (a field of view without the heart, an image it cannot read), and a zero would
    read as a measurement and enter a cohort's averages (``absence_warning`` names them for the user).
    """
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=max(LABELS) + 1)
    volumes = {KEYS[c]: round(float(counts[c]) * voxel_ml, 2) if counts[c] else None for c in LABELS}
    myocardium_ml = float(counts[2]) * voxel_ml  # the mass from the volume before rounding
    volumes["lv_myocardium_mass_g"] = round(myocardium_ml * MYOCARDIUM_DENSITY_G_PER_ML, 2) if counts[2] else None
    return volumes


def absence_warning(volumes: dict[str, float | None]) -> str | None:
    """A line naming the structures ``structure_volumes`` found no voxel of, or None when all three are there."""
    absent = [NAMES[key] for key in KEYS.values() if volumes[key] is None]
    if not absent:
        return None
    null = "its volume is" if len(absent) == 1 else "their volumes are"
    return f"the segmentation found no {', '.join(absent)}: {null} null (is the heart in the field of view?)"


def ejection_fractions(end_diastole: dict[str, float | None], end_systole: dict[str, float | None]
                       ) -> tuple[dict[str, float | None], list[str]]:
    """Stroke volumes (mL) and ejection fractions (%) of both ventricles from ED and ES volumes, each ventricle on
    its own: one it cannot be computed for (its cavity absent in a phase, or larger at end systole) is None, with
    the reason in the returned list, and the other is still given. Both larger at end systole is refused: the two
    phases were given the wrong way round."""
    out: dict[str, float | None] = {}
    problems = []
    larger = [side for side, key in VENTRICLES if None not in (end_diastole[key], end_systole[key])
              and end_systole[key] > end_diastole[key]]
    if len(larger) == len(VENTRICLES):
        raise CalidError("both ventricles are larger at end systole than at end diastole: are the phases swapped?")
    for side, key in VENTRICLES:
        edv, esv = end_diastole[key], end_systole[key]
        problem = None
        if not edv or esv is None:  # none found, or a few voxels that round to 0.00 mL
            problem = f"no {side.upper()} cavity at end {'systole' if edv else 'diastole'}"
        elif side in larger:
            problem = f"the {side.upper()} cavity is larger at end systole ({esv} mL) than at end diastole ({edv} mL)"
        if problem:
            problems.append(f"{problem}: no {side.upper()} ejection fraction")
        out[f"{side}_stroke_volume_ml"] = None if problem else round(edv - esv, 2)
        out[f"{side}_ejection_fraction_percent"] = None if problem else round(100.0 * (edv - esv) / edv, 1)
    return out, problems


def cycle_volumes(phase_volumes: list[dict[str, float | None]], times_ms: tuple[float | None, ...]
                  ) -> tuple[dict, list[str]]:
    """Every phase's ``structure_volumes`` (with its index and time), and each ventricle's end diastole and end
    systole over the cycle: the phases of its largest and smallest cavity volume, as a reader picks them from a
    cine, among the phases where that cavity was found (``{side}_missing_phases`` lists the others: a phase the
    segmenter missed must not pass for end systole). The stroke volumes and ejection fractions
    (``ejection_fractions``) of a ventricle found in no phase are None; what is missing is returned as warnings,
    not raised: the labels are still written. ``times_ms``: None where the cine names no time unit."""
    phases = [{"phase": t, "time_ms": times_ms[t], **v} for t, v in enumerate(phase_volumes)]
    out: dict = {"phases": phases}
    ends: dict[str, dict[str, float | None]] = {"ed": {}, "es": {}}
    problems = []
    for side, key in VENTRICLES:
        found = [t for t, v in enumerate(phase_volumes) if v[key] is not None]
        ed = max(found, key=lambda t: phase_volumes[t][key]) if found else None
        es = min(found, key=lambda t: phase_volumes[t][key]) if found else None
        missing = [t for t in range(len(phase_volumes)) if t not in found]
        out[f"{side}_end_diastole_phase"], out[f"{side}_end_systole_phase"] = ed, es
        out[f"{side}_missing_phases"] = missing
        if not found:
            problems.append(f"no {side.upper()} cavity found in any phase: no {side.upper()} ejection fraction")
        elif missing:
            problems.append(f"no {side.upper()} cavity found in {len(missing)} of {len(phases)} phases "
                            f"({', '.join(map(str, missing))}): its end diastole and end systole are chosen among the "
                            "others")
        ends["ed"][key] = None if ed is None else phase_volumes[ed][key]
        ends["es"][key] = None if es is None else phase_volumes[es][key]
    out["ejection_fractions"], _ = ejection_fractions(ends["ed"], ends["es"])  # its reasons are the ones above
    return out, problems
