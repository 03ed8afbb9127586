"""lvdkit: LVD-style image curation and self-supervised pretraining on Ray."""

__version__ = "0.1.0"
