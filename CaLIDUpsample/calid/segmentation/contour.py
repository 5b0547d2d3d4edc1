"""Morphological contour interpolation (ITK), run in a process of its own.

This is what a Slicer user would run otherwise, so the segmentation evaluation compares against it. ITK's
Python wheels and SimpleITK loaded in one process corrupted the heap at exit of long evaluations
(``malloc_consolidate()`` aborts after the results were written), so ITK only ever runs in a spawned
worker that imports nothing but numpy and itk.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ..slice_positions import dense_count


def _interpolate(sparse: np.ndarray) -> np.ndarray:
    import itk  # PyPI itk-morphologicalcontourinterpolation (the ``evaluation`` extra)

    image = itk.image_from_array(np.ascontiguousarray(sparse))  # ITK axis 2 is the slice axis (numpy axis 0)
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetAxis(2)
    interpolator.Update()
    return itk.array_from_image(interpolator.GetOutput()).astype(np.uint8)


def contour_pool() -> ProcessPoolExecutor:
    """A one-process pool for ``contour_interpolation`` calls; reuse it across stacks, then shut it down."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def contour_interpolation(kept_labels: np.ndarray, factor: int, pool: ProcessPoolExecutor | None = None) -> np.ndarray:
    """Labels on every K-th slice of a (slices, rows, cols) grid, interpolated onto all slices between them."""
    n = kept_labels.shape[0]
    sparse = np.zeros((dense_count(n, factor), *kept_labels.shape[1:]), dtype=np.uint8)
    sparse[::factor] = kept_labels
    if pool is not None:
        return pool.submit(_interpolate, sparse).result()
    with contour_pool() as own:
        return own.submit(_interpolate, sparse).result()
