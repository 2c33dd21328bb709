"""Layer 5, what a run leaves behind and what users bring: checkpoints, exported backbones (timm layout, ONNX)
and their model cards, released SwAV/VISSL/timm weights, what identifies a backbone (architecture, input
channels, weights hash), the run folder's layout and the rule that swavkit never touches files it did not
write, the browsable thumbnail pages commands leave, and the preprocessing an export records. The one place
that knows file layouts."""
