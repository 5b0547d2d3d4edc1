"""The names a command, a model's config or a training run may choose from, in one module with no imports.

Why apart: the command line offers them as ``choices`` without importing torch (``calid --help`` stays fast), and
the modules that act on them (``stack_upsampling``, ``progress``, ``motion``, ``networks``, ``training``) check
against the same tuples, so the two cannot drift apart.
"""

UPSAMPLE_METHODS = ("calid", "morph", "linear")
"""``--method``: the model, or what a user gets without it (the optical-flow morph, linear interpolation), so that
a scan can be compared with the peers through the same geometry, intensity handling and outputs."""
CINE_NOISE = ("shared", "independent")  # ``--cine-noise``: one starting noise for every phase, or one each
PROGRESS_MODES = ("bar", "json", "none")  # ``--progress`` (``calid.progress.Progress``)

FLOW_METHODS = ("dis", "dis-fine", "tvl1")  # optical-flow estimators (``calid.motion``)
# How final slices are averaged with the morph (``pipeline_settings.LastStep``).
MORPH_MIX_SPACES = ("pixel", "shape", "aligned")
REFINER_KINDS = ("residual", "synthesis")  # a new refiner's design (``calid.networks.REFINERS``, same keys)
REFINER_LOSSES = ("mse", "l1", "l1+ssim", "l1+ssim+seg")  # ``calid.training.losses.refiner_loss``
