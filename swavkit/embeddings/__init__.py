"""Layer 8, a data set seen through a backbone: ``embed`` writes the L2-normalised features of every image to
a resumable .npy / .parquet file (and reads it back), ``neighbours`` searches such a file (faiss) for nearest
neighbours and near-duplicates."""
