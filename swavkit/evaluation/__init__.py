"""Layer 6, what a backbone is worth: feature extraction, k-NN, linear probe, fine-tuning with few labels,
the cluster explorer, the floors (random init, raw pixels) and the result records."""
