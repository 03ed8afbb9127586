"""Scoring curation decisions against a demo's ``truth.parquet``.

A "family" is an original plus every copy planted from it. A duplicate decision (image -> the image it duplicates)
is correct when both are in the same family; a planted copy is found when it ends in the same group as its
original. Benchmarks and tests use these figures to choose and check defaults.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvdkit.core import schema

RELATIVE = "dedup_relative"


@dataclass
class DedupScore:
    """How a set of duplicate decisions compares with the planted truth."""

    exact_found: int  # planted exact copies grouped with their original
    exact_total: int
    near_found: int  # planted near duplicates grouped with their original
    near_total: int
    decisions: int  # images marked duplicate
    correct: int  # ... of which the image and the one it duplicates are the same family
    clean_originals_removed: int  # originals with no planted copy that were marked duplicate
    clean_originals: int

    @property
    def near_recall(self) -> float:
        return self.near_found / self.near_total if self.near_total else float("nan")

    @property
    def exact_recall(self) -> float:
        return self.exact_found / self.exact_total if self.exact_total else float("nan")

    @property
    def precision(self) -> float:
        return self.correct / self.decisions if self.decisions else 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "near_recall": self.near_recall,
            "exact_recall": self.exact_recall,
            "precision": self.precision,
        }


def load_truth(demo_dir: str | Path) -> pa.Table:
    """The truth table with an added ``uri`` column: the absolute path as ingest records it."""
    demo_dir = Path(demo_dir)
    truth = pq.read_table(demo_dir / "truth.parquet")
    root = os.path.abspath(demo_dir)
    uris = [os.path.join(root, *p.split("/")) for p in truth[schema.TRUTH_PATH].to_pylist()]
    return truth.append_column(schema.URI, pa.array(uris, pa.string()))


def families(truth: pa.Table) -> dict[str, str]:
    """uri -> family key (the original's path) for originals and their planted copies."""
    fam = {}
    for row in truth.select([schema.URI, schema.TRUTH_PATH, schema.TRUTH_KIND, schema.TRUTH_COPY_OF]).to_pylist():
        if row[schema.TRUTH_KIND] == schema.TRUTH_ORIGINAL:
            fam[row[schema.URI]] = row[schema.TRUTH_PATH]
        elif row[schema.TRUTH_KIND] in (schema.TRUTH_EXACT, schema.TRUTH_NEAR):
            fam[row[schema.URI]] = row[schema.TRUTH_COPY_OF]
    return fam


def score_groups(truth: pa.Table, uris: list[str], rep_uris: list[str]) -> DedupScore:
    """Score a grouping: ``rep_uris[i]`` is the kept image of ``uris[i]``'s group (itself when kept)."""
    rep = dict(zip(uris, rep_uris, strict=True))
    fam = families(truth)
    rows = truth.select([schema.URI, schema.TRUTH_PATH, schema.TRUTH_KIND, schema.TRUTH_COPY_OF]).to_pylist()
    uri_of_path = {r[schema.TRUTH_PATH]: r[schema.URI] for r in rows}
    copied = {r[schema.TRUTH_COPY_OF] for r in rows if r[schema.TRUTH_KIND] in (schema.TRUTH_EXACT, schema.TRUTH_NEAR)}

    def found(kind: str) -> tuple[int, int]:
        pairs = [(r[schema.URI], uri_of_path[r[schema.TRUTH_COPY_OF]]) for r in rows if r[schema.TRUTH_KIND] == kind]
        hits = sum(1 for u, o in pairs if u in rep and o in rep and rep[u] == rep[o])
        return hits, len(pairs)

    decisions = [(u, r) for u, r in rep.items() if u != r]
    correct = sum(1 for u, r in decisions if fam.get(u) is not None and fam.get(u) == fam.get(r))
    clean = [
        r[schema.URI]
        for r in rows
        if r[schema.TRUTH_KIND] == schema.TRUTH_ORIGINAL and r[schema.TRUTH_PATH] not in copied
    ]
    removed = sum(1 for u in clean if u in rep and rep[u] != u)
    exact_found, exact_total = found(schema.TRUTH_EXACT)
    near_found, near_total = found(schema.TRUTH_NEAR)
    return DedupScore(exact_found, exact_total, near_found, near_total, len(decisions), correct, removed, len(clean))


def score_status(truth: pa.Table, status: pa.Table) -> DedupScore:
    """Score the self-dedup decisions of lvdkit's ``status.parquet`` (duplicates name the finally kept image).

    Images removed by ``dedup_relative`` (copies of protected images) are left out: see :func:`score_relative`.
    """
    return score_groups(truth, *status_groups(status))


def status_groups(status: pa.Table) -> tuple[list[str], list[str]]:
    """(uris, kept uri of each one's group) from ``status.parquet``, quarantined and relative-dedup rows left out."""
    uri_of_id = dict(zip(status[schema.IMAGE_ID].to_pylist(), status[schema.URI].to_pylist(), strict=True))
    live = status.filter(
        pa.compute.and_(
            pa.compute.not_equal(status[schema.STATUS_COL], schema.STATUS_QUARANTINED),
            pa.compute.not_equal(pa.compute.fill_null(status[schema.REASON], ""), RELATIVE),
        )
    )
    # A duplicate whose kept image was then removed as a copy of a protected image points outside the pool.
    pairs = [
        (u, d)
        for u, d in zip(live[schema.URI].to_pylist(), live[schema.DUP_OF].to_pylist(), strict=True)
        if d is None or d in uri_of_id
    ]
    return [u for u, _ in pairs], [uri_of_id[d] if d else u for u, d in pairs]


def near_found_by_transform(truth: pa.Table, uris: list[str], rep_uris: list[str]) -> dict[str, tuple[int, int]]:
    """Per edit (``transform``) of the planted near duplicates: (grouped with their original, planted)."""
    rep = dict(zip(uris, rep_uris, strict=True))
    rows = truth.select(
        [schema.URI, schema.TRUTH_PATH, schema.TRUTH_KIND, schema.TRUTH_COPY_OF, schema.TRUTH_TRANSFORM]
    )
    uri_of_path = dict(zip(rows[schema.TRUTH_PATH].to_pylist(), rows[schema.URI].to_pylist(), strict=True))
    counts: dict[str, tuple[int, int]] = {}
    for r in rows.to_pylist():
        if r[schema.TRUTH_KIND] != schema.TRUTH_NEAR:
            continue
        u, o = r[schema.URI], uri_of_path[r[schema.TRUTH_COPY_OF]]
        hit = u in rep and o in rep and rep[u] == rep[o]
        found, total = counts.get(r[schema.TRUTH_TRANSFORM], (0, 0))
        counts[r[schema.TRUTH_TRANSFORM]] = (found + hit, total + 1)
    return counts


@dataclass
class RelativeScore:
    """Planted leaks of protected images into the pool, and what relative dedup did about them."""

    leaked: int  # planted near copies of protected (held-out) images in the pool
    caught: int  # ... removed by dedup_relative
    caught_earlier: int  # ... removed by a self-dedup stage before it (so never reaching it)
    wrongly_removed: int  # pool images that copy no protected image, removed by dedup_relative


def score_relative(truth: pa.Table, status: pa.Table) -> RelativeScore:
    """Score ``dedup_relative`` against the ``leaked_heldout`` rows of the truth table."""
    leaked = set(truth.filter(pa.compute.equal(truth[schema.TRUTH_KIND], schema.TRUTH_LEAKED))[schema.URI].to_pylist())
    reason = dict(zip(status[schema.URI].to_pylist(), status[schema.REASON].to_pylist(), strict=True))
    caught = sum(reason.get(u) == RELATIVE for u in leaked)
    earlier = sum(reason.get(u) not in (None, RELATIVE) for u in leaked)
    wrong = sum(1 for u, r in reason.items() if r == RELATIVE and u not in leaked)
    return RelativeScore(len(leaked), caught, earlier, wrong)


def score_pairs(truth: pa.Table, uris: list[str], pairs: np.ndarray) -> DedupScore:
    """Score a tool that reports duplicate pairs (e.g. imagededup): pairs become union-find groups."""
    from lvdkit.curation.components import connected_components, representatives

    labels = connected_components(len(uris), pairs)
    rep = representatives(labels, np.arange(len(uris)))
    return score_groups(truth, uris, [uris[i] for i in rep])
