"""Layer 9, groups of images: the cluster explorer (``explorer``: which images each SwAV prototype
collected), spherical k-means on embeddings (``kmeans``) and the folders of groups built on it
(``groups``: ``swavkit cluster --k`` and ``swavkit assign``)."""
