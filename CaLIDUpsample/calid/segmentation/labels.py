"""The label convention (ACDC's) shared by the network, the CLI and the Slicer module; imports nothing heavy."""

LABELS = {1: "right ventricle cavity", 2: "left ventricle myocardium", 3: "left ventricle cavity"}
"""Label values (0 is background)."""

SHORT_NAMES = {1: "rv", 2: "myo", 3: "lv"}
