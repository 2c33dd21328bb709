"""Layer 4, the method: the SwAV model (timm backbone, projection head, prototypes), Sinkhorn-Knopp, the
swapped-prediction loss, optimisers and LR schedules. Pure maths with explicit arguments; no files, no
data loading, no run folders."""
