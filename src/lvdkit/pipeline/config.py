"""The curation run's config: output folder, Ray settings, and one section per stage (each stage owns its own)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from lvdkit.cluster.stage import ClusterConfig
from lvdkit.core.settings import RayConfig
from lvdkit.curation.curated import CuratedConfig
from lvdkit.curation.dedup_copy import DedupCopyConfig
from lvdkit.curation.dedup_exact import DedupExactConfig
from lvdkit.curation.dedup_phash import DedupPhashConfig
from lvdkit.curation.dedup_relative import DedupRelativeConfig
from lvdkit.curation.ingest import IngestConfig
from lvdkit.curation.retrieve import RetrieveConfig
from lvdkit.embeddings.stage import EmbedConfig


@dataclasses.dataclass
class CurateConfig:
    """The whole curation run: output folder, Ray settings, and one section per stage."""

    out: str = "out/curate"
    progress: bool = True
    # A part that still raises after ray.max_task_retries retries: "fail" the stage naming the files that fail on
    # their own (the other parts finish and are kept), or "quarantine" those files (ingest: processing_error rows;
    # curated: left out of the curated set, listed in OUT/curated/_quarantined/). embed always fails.
    on_part_error: Literal["fail", "quarantine"] = "fail"
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    dedup_exact: DedupExactConfig = dataclasses.field(default_factory=DedupExactConfig)
    dedup_phash: DedupPhashConfig = dataclasses.field(default_factory=DedupPhashConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    dedup_copy: DedupCopyConfig = dataclasses.field(default_factory=DedupCopyConfig)
    dedup_relative: DedupRelativeConfig = dataclasses.field(default_factory=DedupRelativeConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = dataclasses.field(default_factory=RetrieveConfig)
    curated: CuratedConfig = dataclasses.field(default_factory=CuratedConfig)

    RENAMED: typing.ClassVar[dict[str, str]] = {"shard": "curated", "on_part_error": "on_part_error"}
