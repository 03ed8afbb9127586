"""lvdkit: LVD-style image curation and self-supervised pretraining on Ray."""

import logging

__version__ = "0.1.0"

# Faiss logs at INFO each CPU build it tries (avx512, avx2, generic); Ray workers print those lines for every process.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def __getattr__(name: str) -> object:
    # Imported on first use, so `import lvdkit` (and the CLI's --help) stays light.
    if name in ("load_curated", "decode"):
        from lvdkit import curated

        return getattr(curated, name)
    raise AttributeError(f"module 'lvdkit' has no attribute {name!r}")
