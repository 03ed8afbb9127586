"""Clustering for curation: Faiss k-means, hierarchical k-means with resampling, and balanced sampling over it
(Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning")."""

from lvdkit.cluster.hierarchical import HierarchicalConfig, HierarchicalResult, default_levels, hierarchical_kmeans
from lvdkit.cluster.kmeans import assign_to_centroids, kmeans, kmeans_pp_seeds
from lvdkit.cluster.sampling import allocate, balanced_sample, find_cap

__all__ = [
    "HierarchicalConfig",
    "HierarchicalResult",
    "allocate",
    "assign_to_centroids",
    "balanced_sample",
    "default_levels",
    "find_cap",
    "hierarchical_kmeans",
    "kmeans",
    "kmeans_pp_seeds",
]
