"""Layer 1, the process: devices and precision, CPU cores (workers, threads), torch.distributed launch and
collectives, stop signals, atomic file writes. Imports nothing of swavkit but ``swavkit.errors``."""
