"""Stage names in run order, importable without loading Ray, torch or Faiss (for fast ``--help``)."""

CURATE_ORDER: tuple[str, ...] = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy", "dedup_relative")


def stage_names() -> str:
    """Valid stage names, for error messages and --help."""
    return ", ".join(CURATE_ORDER)
