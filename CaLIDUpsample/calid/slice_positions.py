"""Where the missing slices of an acquired stack sit: index arithmetic on the dense grid, no images.

Apart from ``geometry`` (which wraps arrays in SimpleITK images) so that generation and training need no SimpleITK:
the GPU machine this project is lent has none (README, Development: on a lent GPU).

Dense slice ``i * K`` is acquired slice ``i``; the K - 1 slices between acquired slices ``i`` and ``i + 1`` are the
missing ones, at fractions ``1/K ... (K-1)/K`` of the gap.
"""

from __future__ import annotations

import numpy as np


def dense_count(n: int, factor: int) -> int:
    """Slices of the dense grid of an n-slice stack upsampled by K: the acquired ones and K - 1 in each gap."""
    return (n - 1) * factor + 1


def missing_count(n: int, factor: int) -> int:
    """The new slices of an n-slice stack upsampled by K: K - 1 in each of its n - 1 gaps."""
    return (n - 1) * (factor - 1)


def acquired_count(dense: int, factor: int) -> int:
    """Acquired slices behind a dense grid of ``dense`` slices at K (the inverse of ``dense_count``)."""
    return (dense - 1) // factor + 1


def protocol_count(n: int, factor: int) -> int:
    """Slices of an n-slice stack the removed-slice protocol uses at K: the most that begin and end on a kept slice
    (every K-th is kept, the others removed and rebuilt)."""
    return (n - 1) // factor * factor + 1


def removed_slices(count: int, factor: int) -> np.ndarray:
    """Indices the removed-slice protocol removes from a ``protocol_count`` stack: all but every K-th."""
    return np.array([i for i in range(count) if i % factor])


def dense_positions(n: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every missing dense slice: index of the acquired slice below, index above, and alpha in (0, 1)."""
    gaps = np.repeat(np.arange(n - 1), factor - 1)
    steps = np.tile(np.arange(1, factor), n - 1)
    return gaps, gaps + 1, steps / factor


def dense_index(below: np.ndarray, alpha: np.ndarray, factor: int) -> np.ndarray:
    return (below * factor + np.rint(alpha * factor)).astype(int)


def generated_slices(n: int, factor: int) -> np.ndarray:
    """Dense slice index of every missing slice of an n-slice stack, in ``dense_positions`` order."""
    below, _, alpha = dense_positions(n, factor)
    return dense_index(below, alpha, factor)
