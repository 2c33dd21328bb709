"""Layer 6, what a backbone is worth: feature extraction, k-NN, linear probe, fine-tuning with few labels,
their shared set-up (``setup``), the floors (random init, raw pixels), baselines and the result records."""
