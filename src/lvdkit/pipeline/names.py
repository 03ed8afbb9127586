"""Stage names in run order, importable without loading Ray, torch or Faiss (for fast ``--help``)."""

CURATE_ORDER: tuple[str, ...] = (
    "ingest",
    "dedup_exact",
    "dedup_phash",
    "embed",
    "dedup_copy",
    "dedup_relative",
    "cluster",
    "retrieve",
    "shard",
)


def stage_names() -> str:
    """Valid stage names, for error messages and --help."""
    return ", ".join(CURATE_ORDER)


# Output folder of a stage, when it is not the stage's name: the curated set is what users open.
STAGE_DIRS: dict[str, str] = {"shard": "curated"}


def stage_dirname(stage: str) -> str:
    """The folder under OUT holding ``stage``'s output."""
    return STAGE_DIRS.get(stage, stage)
