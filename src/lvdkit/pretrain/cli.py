"""Command-line parts for pretraining: ``pretrain``, ``export``, ``embed``, ``eval knn`` (wired into ``lvdkit.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

COMMANDS = ("pretrain", "export", "embed", "eval")
_OVERRIDES_HELP = (
    "config overrides as key=value, dotted for sections (e.g. out=out/pt method=simclr optim.epochs=5 "
    "optim.accumulate_steps=4 init=out/pt0.safetensors resume=true); values are YAML"
)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm:NAME, torchvision:NAME, an exported FILE.safetensors, sscd")
    p.add_argument("--img-size", type=int, help="input side in pixels (exported files know theirs)")
    p.add_argument("--model-kwargs", type=yaml.safe_load, default={}, help="YAML mapping for the constructor")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error (exit 2) naming the first unusable image, instead of skipping and listing "
        "unusable images (empty, not an image, truncated, unreadable, too large: ingest's rules)",
    )


def add_subcommands(sub: Any) -> None:
    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain a backbone on curated parts with Ray Train (method=dinov2, dino, simclr or distillation)",
        description="Train a backbone, reading Parquet parts with Ray Data: method=dinov2 (DINO + iBOT + KoLeo, "
        "EMA teacher; the default), dino (DINO v1: multi-crop, EMA teacher, softmax centering), simclr (two views, "
        "NT-Xent) or distillation (a frozen teacher into a student). init= starts from weights (an export, a "
        "state-dict file, or timm:NAME hub weights); optim.accumulate_steps=N accumulates gradients. Checkpoints, "
        "metrics.jsonl and tensorboard/ go to OUT; resume=true continues an interrupted run. Presets: "
        "configs/pretrain_demo.yaml, dino_demo.yaml, simclr_demo.yaml, simclr_cnn_demo.yaml, distill_demo.yaml (CPU); "
        "pretrain_vits14.yaml, distill_vits14_resnet50.yaml (GPUs). strategy=fsdp shards large models.",
    )
    pretrain.add_argument("--config", "-c", type=Path, help="YAML file of config overrides")
    pretrain.add_argument("--address", help="Ray cluster address (else RAY_ADDRESS, else a local Ray)")
    pretrain.add_argument(
        "--print-config", action="store_true", help="print the resolved config (every key checked) as YAML and exit"
    )
    pretrain.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)

    export = sub.add_parser(
        "export",
        help="write a run's backbone as safetensors + JSON (timm/torchvision load it directly)",
        description="Export the backbone of RUN's latest checkpoint: DINOv2's and DINO's EMA teacher by default, "
        "or the student; SimCLR and distillation export their student.",
    )
    export.add_argument("run", help="the pretraining run folder (its out=; a local path or s3://...)")
    export.add_argument("--out", required=True, help="FILE.safetensors, local or s3://... (a FILE.json sidecar too)")
    export.add_argument("--which", choices=("teacher", "student"), help="which network (default: by method)")
    export.add_argument("--checkpoint", help="a specific checkpoint folder instead of the latest")

    embed = sub.add_parser(
        "embed",
        help="embed every image under a folder into Parquet",
        description="Embed every image file under --data. Images are read as ingest reads them; unusable ones "
        "(empty, not an image, truncated, ...) are skipped, counted on stderr and listed with their reason in "
        "_<name>.skipped.parquet beside the output (path, reason, detail). --strict makes the first one an error.",
    )
    _model_options(embed)
    embed.add_argument("--data", required=True, type=Path, help="folder of images (walked recursively)")
    embed.add_argument("--out", required=True, type=Path, help="output folder (part-00000.parquet) or FILE.parquet")
    embed.add_argument("--batch-size", type=int, default=64)

    evaluate = sub.add_parser("eval", help="evaluate a backbone on labeled data")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True, metavar="KIND")
    knn = kinds.add_parser(
        "knn",
        help="weighted k-NN (DINO: k=20, T=0.07) and a linear probe",
        description="Labeled data: a folder with one sub-folder per class, or Parquet with a label column. "
        "Without --test, --train is split (stratified) by --test-fraction. Unusable images (empty, not an image, "
        "truncated, ...) are left out, counted and listed on stderr and under 'skipped' in --json; --strict makes "
        "the first one an error.",
    )
    _model_options(knn)
    knn.add_argument("--train", required=True, type=Path)
    knn.add_argument("--test", type=Path)
    knn.add_argument("--test-fraction", type=float, default=0.5)
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--baseline", action="store_true", help="also score a random-init model of the same architecture")
    knn.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "export":
        from lvdkit.pretrain.export import export

        path = export(args.run, args.out, args.which, args.checkpoint)
        print(f"exported {path} (+ {Path(str(path)).with_suffix('.json').name})")
        return 0
    if args.command == "embed":
        from lvdkit.pretrain.evaluate import embed_folder, skip_summary

        done = embed_folder(
            args.model,
            args.data,
            args.out,
            img_size=args.img_size,
            kwargs=args.model_kwargs,
            batch_size=args.batch_size,
            device=args.device,
            strict=args.strict,
        )
        if done.skipped:
            print(f"lvdkit embed: skipped {skip_summary(done.skipped)}; listed in {done.skipped_file}", file=sys.stderr)
        print(f"embeddings in {done.target}")
        return 0
    return _eval_knn(args)


def _pretrain(args: argparse.Namespace) -> int:
    from lvdkit.core.settings import config_yaml, load_config
    from lvdkit.pretrain.config import PretrainConfig
    from lvdkit.pretrain.run import pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.address:
        cfg.ray.address = args.address
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    record = pretrain(cfg)
    m = record.get("metrics", {})
    print(f"finished step {record['step']}/{record['total_steps']}; last loss {m.get('loss', float('nan')):.4f}")
    print(f"checkpoint: {record['checkpoint']}  (lvdkit export {cfg.out} --out MODEL.safetensors)")
    return 0


def _baseline(model: str, kwargs: dict[str, Any], img_size: int | None) -> tuple[str, dict[str, Any], int | None]:
    """The random-init twin of ``model``: an exported file's architecture from its sidecar."""
    if model.endswith(".safetensors") or model.startswith("lvdkit:"):
        from lvdkit.embeddings.model_file import read_sidecar

        name, saved = read_sidecar(model.removeprefix("lvdkit:"))
        saved = dict(saved)
        return name, saved, saved.pop("img_size", None)
    return model, kwargs, img_size


def _eval_knn(args: argparse.Namespace) -> int:
    from lvdkit.pretrain.evaluate import evaluate, load_labeled, split

    train = load_labeled(args.train)
    test = load_labeled(args.test) if args.test else None
    if test is None:
        train, test = split(train, args.test_fraction)
    runs = [(args.model, args.model_kwargs, args.img_size)]
    if args.baseline:
        runs.append(_baseline(args.model, args.model_kwargs, args.img_size))
    results = []
    for i, (model, kwargs, size) in enumerate(runs):
        r = evaluate(
            model,
            train,
            test,
            img_size=size,
            kwargs=kwargs,
            k=args.k,
            temperature=args.temperature,
            device=args.device,
            strict=args.strict,
        )
        r["random_init"] = i == 1
        if i == 0:  # decoding does not depend on the model: the baseline skips the same images
            _report_skipped(r["skipped"])
        results.append(r)
        label = f"{model} (random init)" if i == 1 else model
        print(
            f"{label}: k-NN top-1 {r['knn_top1']:.3f}  linear top-1 {r['linear_top1']:.3f}  "
            f"(train {r['n_train']}, test {r['n_test']}, dim {r['dim']})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _report_skipped(skipped: list[dict[str, str]]) -> None:
    """eval: the count by reason, then one ``  PATH (SPLIT): REASON (DETAIL)`` line per skipped image, on stderr."""
    from lvdkit.pretrain.evaluate import Skipped, skip_summary

    if not skipped:
        return
    summary = skip_summary([Skipped(s["path"], s["reason"], s["detail"]) for s in skipped])
    print(f"lvdkit eval: skipped {summary}:", file=sys.stderr)
    for s in skipped:
        print(f"  {s['path']} ({s['split']}): {s['reason']} ({s['detail']})", file=sys.stderr)
