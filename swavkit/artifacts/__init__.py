"""Layer 5, what a run leaves behind and what users bring: checkpoints, exported backbones and their model
cards, released SwAV/VISSL/timm weights, the run folder's layout and the rule that swavkit never touches
files it did not write, and the preprocessing an export records. The one place that knows file layouts."""
