"""CaLID: cardiac latent interpolation diffusion for short-axis MRI (no Slicer or Qt imports here).

Python API::

    import SimpleITK as sitk, calid
    dense = calid.upsample_image(sitk.ReadImage("sax.nii.gz"), calid.UpsampleOptions(factor=2)).image
    calid.upsample_file("sax.nii.gz", "sax_x2.nii.gz", calid.UpsampleOptions(factor=2, device="cpu"))

The engine is imported lazily, so light modules (``calid.modelindex``) can be used without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_LAZY = {"UpsampleOptions": "engine", "UpsampleResult": "engine", "upsample_file": "engine", "upsample_image": "engine",
         "CalidError": "errors"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'calid' has no attribute {name!r}")
