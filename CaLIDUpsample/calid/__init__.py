"""CaLID: cardiac latent interpolation diffusion for short-axis MRI (no Slicer or Qt imports here).

Python API::

    import SimpleITK as sitk, calid
    dense = calid.upsample_image(sitk.ReadImage("sax.nii.gz"), calid.UpsampleOptions(factor=2)).image
    calid.upsample_file("sax.nii.gz", "sax_x2.nii.gz", calid.UpsampleOptions(factor=2, device="cpu"))
"""

from .engine import UpsampleOptions, UpsampleResult, upsample_file, upsample_image
from .errors import CalidError

__version__ = "0.1.0"
__all__ = ["CalidError", "UpsampleOptions", "UpsampleResult", "upsample_file", "upsample_image", "__version__"]
