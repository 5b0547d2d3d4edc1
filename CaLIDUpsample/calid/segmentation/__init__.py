"""Cardiac segmentation of short-axis stacks (RV cavity, LV myocardium, LV cavity), dense or sparse.

``network``: the 2D MONAI U-Net and the fixed in-plane grid it works on; ``store``: segmentation model
folders; ``inference``: label volumes on any stack's own grid; ``sparse``: dense labels from a user's
labels of the acquired slices; ``measures``: volumes in mL and ejection fractions; ``training``: the
trainer behind ``calid train-segmentation``; ``evaluation``: Dice/HD95 and the removed-slice protocol.
"""
