"""Per-volume intensity normalisation between the scanner's scale and the network's range.

MRI intensities have no absolute unit, so each volume is mapped by its own robust percentiles to about
[-1, 1] for the network, and generated slices are mapped back with the inverse of the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


@dataclass(frozen=True)
class IntensityMap:
    """Affine map ``network = (value - low) / (high - low) * 2 - 1`` and its inverse."""

    low: float
    high: float

    @classmethod
    def fit(cls, volume: np.ndarray) -> "IntensityMap":
        low, high = np.percentile(volume, [LOW_PERCENTILE, HIGH_PERCENTILE])
        if high <= low:  # a constant (or nearly) volume: keep the map invertible
            high = low + 1.0
        return cls(float(low), float(high))

    def to_network(self, values: np.ndarray) -> np.ndarray:
        return ((values.astype(np.float32) - self.low) / (self.high - self.low) * 2.0 - 1.0).astype(np.float32)

    def from_network(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Network values -> the input's units, float64 (into ``out`` when given: a part of a larger result).

        In place on one float64 copy, the same operations in the same order: a cine's new slices are hundreds of
        MB, and each step of the plain expression held another copy of them."""
        out = _float64_copy(values, out)
        out += 1.0
        out /= 2.0
        out *= self.high - self.low
        out += self.low
        return out

    def size_from_network(self, sizes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Differences or error sizes in network units -> the same in the input's units (no offset), as
        ``from_network``."""
        out = _float64_copy(sizes, out)
        out *= (self.high - self.low) / 2.0
        return out


def _float64_copy(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return values.astype(np.float64)
    out[...] = values
    return out
