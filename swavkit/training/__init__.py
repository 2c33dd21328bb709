"""Layer 7, pretraining: set-up stages, the loop and its step, --auto presets and time budgets, collapse
control, metric loggers, diagnosis and plots. ``trainer.train`` is ``swavkit.train``."""
