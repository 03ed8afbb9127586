"""Stage names in run order, importable without loading Ray, torch or Faiss (for fast ``--help``).

Each stage writes into ``OUT/<stage name>/``; the last one, ``curated``, makes the curated set users open.
"""

CURATE_ORDER: tuple[str, ...] = (
    "ingest",
    "dedup_exact",
    "dedup_phash",
    "embed",
    "dedup_copy",
    "dedup_relative",
    "cluster",
    "retrieve",
    "curated",
)


def stage_names() -> str:
    """Valid stage names, for error messages and --help."""
    return ", ".join(CURATE_ORDER)
