"""Side by side with LightlyTrain: the same SimCLR, model, images, image size, batch and wall budget; img/s and k-NN.

LightlyTrain (``lightly-train`` on PyPI) is a baseline here, never a dependency: it lives in its own virtual
environment (``--lt-python``; this script prints the install command when it is missing) and runs through
``bench/_lightlytrain_run.py``, which imports nothing of lvdkit. It reads image files and stops on one it cannot
read, so it gets the curated set of ``--out`` (the ``OUT/curated`` parts its ``_SUCCESS`` lists, what lvdkit
pretraining reads) written out as a folder: JPEG and PNG bytes as stored, anything else decoded by ingest's rules
and saved as PNG.

Both train the preset (``--config``, default ``configs/simclr_cnn_demo.yaml``, a SimCLR ResNet-10t, with the
``key=value`` overrides given) from random init: lvdkit with ``lvdkit pretrain``,
LightlyTrain with ``lightly_train.pretrain(method="simclr", model="timm/<the same name>")`` given the preset's image
size, batch size, seed, NT-Xent temperature, projection head widths (both Linear-BN-ReLU-Linear), crop scale, flip
probability, colour-jitter strength (0.8 s, 0.8 s, 0.8 s, 0.2 s, p 0.8), grayscale (p 0.2) and blur (p 0.5, sigma
0.1-2, the preset's kernel). Each keeps its own optimizer recipe (lvdkit: AdamW, sqrt lr scaling, cosine with
warm-up; LightlyTrain's SimCLR: SGD lr 0.3 x batch/256, momentum 0.9, cosine with warm-up): the method column says
which; ``--lt-arg KEY=JSON`` sets any ``lightly_train.pretrain`` argument (dicts are merged), e.g.
``--lt-arg optim='"adamw"'``.

The budget (``--minutes``, per tool) is the whole training process: start-up, training, export. Each tool gets the
epochs its own speed fits in it (``--epochs N``: N for both): lvdkit from a probe of its training step on pre-made
tensors as in bench/pretrain_methods.py (``--startup-s``, ``--efficiency``), LightlyTrain from a ``--probe-steps``
run of its own pipeline (start-up and seconds per step measured). Hard stop at the budget: lvdkit's process is
killed and its latest checkpoint exported; LightlyTrain gets Lightning's ``max_time`` (the budget less its measured
start-up) and exports as usual. Probes are not counted in the budget.

img/s is the training loop's: the images of steps 2..N over the time from the end of step 1 to the end of step N
(augmentation, waits for data and mid-run checkpoints included; start-up, the first batch and the export not);
wall s is the whole process. Exports are scored as ``lvdkit eval knn --train HELDOUT`` scores them (stratified 50/50
split, weighted k-NN k=20 T=0.07, linear probe): lvdkit's export as is, LightlyTrain's ``exported_last.pt`` (the timm
model's state dict) loaded into the same timm model (its classifier keys dropped, every other key and shape must
match) and saved as an lvdkit model file; beside raw pixels (28x28 grayscale) and the random-init model.

Usage: python bench/lightlytrain_compare.py [--out out/demo] [--heldout out/demo-data/heldout] [--minutes 8]
       [--config configs/simclr_cnn_demo.yaml] [--epochs N] [--lt-python /work/lt-venv/bin/python]
       [--lt-arg KEY=JSON ...] [--keep DIR] [--json FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line
from lvdkit.core import schema
from lvdkit.core.image import decode_rgb
from lvdkit.core.settings import load_config
from lvdkit.embeddings.model_file import save_lvdkit_model
from lvdkit.embeddings.weights import load_into
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.evaluate import Labeled, evaluate, knn_accuracy, load_labeled, split
from lvdkit.pretrain.export import export
from lvdkit.pretrain.models import build_backbone
from lvdkit.pretrain.run import parquet_files, plan
from pretrain_methods import raw_pixels
from pretrain_throughput import bare_loop

DEFAULT_LT_PYTHON = "/work/lt-venv/bin/python"
LT_INSTALL = (
    "python3 -m venv /work/lt-venv && "
    "/work/lt-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 'lightly-train[timm]==0.18.0'"
)
RUNNER = Path(__file__).with_name("_lightlytrain_run.py")
LT_ENV = {"LIGHTLY_TRAIN_EVENTS_DISABLED": "1", "HF_HUB_OFFLINE": "1"}  # no usage events, no hub downloads
HEADERS = ["tool", "method", "model", "epochs", "images seen", "steps", "wall s", "img/s", "k-NN top-1", "linear"]


# --- processes ---------------------------------------------------------------------------------------------------


def run_bounded(cmd: list[str], timeout_s: float, log: Path) -> int | None:
    """Run ``cmd`` (output to ``log``) in its own session; None when it ran out of time. At the limit it gets
    Ctrl-C (Ray shuts down the local cluster it started), 30 s later whatever is left of its session is killed, as
    are, in any case, the processes of its session still running when it ends (Ray workers in their own groups)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            return None
        finally:
            for pid in session(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def session(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux ``/proc``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                continue
    return pids


# --- data ---------------------------------------------------------------------------------------------------------


def write_folder(curated: Path, folder: Path) -> int:
    """The curated images as files in ``folder`` (JPEG/PNG bytes as stored, others decoded and saved as PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for part in parquet_files(curated, schema.IMAGE):
        for batch in pq.ParquetFile(str(part)).iter_batches(columns=[schema.IMAGE], batch_size=256):
            for data in batch.column(0).to_pylist():
                if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
                    (folder / f"{n:06d}{'.jpg' if data[0] == 0xFF else '.png'}").write_bytes(data)
                else:
                    decode_rgb(data).save(folder / f"{n:06d}.png")
                n += 1
    return n


# --- lvdkit -------------------------------------------------------------------------------------------------------


def lvdkit_epochs(cfg: PretrainConfig, n_images: int, args: argparse.Namespace, device: torch.device) -> int:
    """Epochs that fit the budget: the training step probed on pre-made tensors (bench/pretrain_methods.py's rule)."""
    s_per_step = bare_loop(cfg, steps=args.probe_steps, warmup=3, device=device)["s_per_step"]
    seconds_per_epoch = s_per_step * plan(cfg, n_images)[0] / args.efficiency
    epochs = max(1, int((args.minutes * 60 - args.startup_s) / seconds_per_epoch))
    print(f"lvdkit: {s_per_step:.3f} s/step probed -> {epochs} epochs (load {os.getloadavg()[0]:.1f})", flush=True)
    return epochs


def train_lvdkit(cfg: PretrainConfig, overrides: list[str], run: Path, epochs: int, args: argparse.Namespace) -> dict:
    """``lvdkit pretrain`` with a hard stop at the budget; the run's figures and its export."""
    cmd = [sys.executable, "-m", "lvdkit.cli", "pretrain", "--config", str(args.config), *overrides]
    cmd += [f"out={run}", f"data={args.out / 'curated'}", "progress=false", f"optim.epochs={epochs}"]
    load, start = os.getloadavg()[0], time.perf_counter()
    code = run_bounded(cmd, args.minutes * 60, run.with_suffix(".log"))
    wall = time.perf_counter() - start
    if code not in (0, None):
        raise RuntimeError(f"lvdkit pretrain failed (exit {code}); see {run.with_suffix('.log')}")
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    per_step = cfg.optim.step_batch * cfg.num_workers
    steps = int(rows[-1]["step"]) if rows else 0
    loop = rows[-1]["time"] - rows[0]["time"] if len(rows) > 1 else 0.0
    lr = cfg.optim.lr * (per_step / 1024) ** 0.5
    try:
        model_file: str | None = str(export(run, run.with_suffix(".safetensors")))
    except FileNotFoundError:  # stopped before its first checkpoint
        model_file = None
    return {
        "tool": "lvdkit",
        "method": f"SimCLR, AdamW lr {lr:.2g}",
        "epochs": epochs,
        "steps": steps,
        "images_seen": steps * per_step,
        "wall_s": wall,
        "img_s": (steps - rows[0]["step"]) * per_step / loop if loop > 0 else None,
        "stopped_at_budget": code is None,
        "load_before": load,  # another job on the machine slows either tool: say so
        "model_file": model_file,
    }


# --- LightlyTrain -------------------------------------------------------------------------------------------------


def lt_ready(python: str) -> bool:
    """True when ``python`` exists and imports lightly_train."""
    if not Path(python).exists():
        return False
    return subprocess.run([python, "-c", "import lightly_train"], capture_output=True).returncode == 0


def timm_name(model: str) -> str:
    """lvdkit's ``timm:NAME`` -> LightlyTrain's ``timm/NAME`` (the comparison needs the same timm architecture)."""
    kind, _, name = model.partition(":")
    if kind != "timm" or not name:
        raise SystemExit(f"model={model}: this comparison takes timm models (timm:NAME), built alike in both tools")
    return f"timm/{name}"


def lt_spec(cfg: PretrainConfig, folder: Path, run: Path, epochs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """``lightly_train.pretrain`` keyword arguments mirroring the preset (see the module docstring)."""
    size, crops, s = cfg.crops.global_size, cfg.crops, cfg.simclr
    _, _, identity = build_backbone(cfg.model, size, dict(cfg.model_kwargs))
    model_args = {k: v for k, v in identity.items() if k != "img_size"}
    if "vit" in cfg.model:  # timm ViTs take img_size (lvdkit builds them at the crop size); CNNs take none
        model_args["img_size"] = size
    strength = crops.simclr_colour
    spec: dict[str, Any] = {
        "out": str(run),
        "data": str(folder),
        "model": timm_name(cfg.model),
        "model_args": model_args,
        "method": "simclr",
        "method_args": {"hidden_dim": s.proj_hidden_dim, "output_dim": s.proj_out_dim, "temperature": s.temperature},
        "epochs": epochs,
        "batch_size": cfg.optim.batch_size,
        "seed": cfg.seed,
        "overwrite": True,
        "transform_args": {
            "image_size": [size, size],
            "random_resize": {"min_scale": crops.simclr_scale[0], "max_scale": crops.simclr_scale[1]},
            "random_flip": {"horizontal_prob": crops.flip_p, "vertical_prob": 0.0},
            "color_jitter": {
                **{"prob": 0.8, "strength": strength, "brightness": 0.8, "contrast": 0.8},
                **{"saturation": 0.8, "hue": 0.2},
            },
            "random_gray_scale": 0.2,
            "gaussian_blur": {"prob": 0.5, "sigmas": [0.1, 2.0], "blur_limit": [crops.blur_kernel] * 2},
        },
    }
    for key, value in extra.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) and isinstance(value, dict) else value
    return spec


def run_lt(python: str, spec: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any], float]:
    """Run LightlyTrain on ``spec`` in its environment; (the runner's result, process wall seconds)."""
    run = Path(spec["out"])
    run.parent.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = run.with_suffix(".spec.json"), run.with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec, indent=1) + "\n")
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    code = run_bounded([python, str(RUNNER), str(spec_file), str(result_file)], timeout_s, run.with_suffix(".log"))
    wall = time.perf_counter() - start
    if code != 0 or not result_file.exists():
        why = "ran out of time" if code is None else f"exit {code}"
        raise RuntimeError(f"LightlyTrain {why}; see {run.with_suffix('.log')}")
    return json.loads(result_file.read_text()), wall


def lt_probe(python: str, spec: dict[str, Any], steps: int) -> tuple[float, float]:
    """A ``steps``-step LightlyTrain run: (seconds per step after the first, process seconds outside steps 2..N)."""
    probe = {**spec, "out": spec["out"] + "-probe", "epochs": 1, "trainer_args": {"max_steps": steps}}
    result, wall = run_lt(python, probe, 600)
    ends = result["step_ends_s"]
    if len(ends) < 3:
        raise RuntimeError(f"LightlyTrain probe made {len(ends)} steps; more images or --probe-steps needed")
    s_per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
    return s_per_step, wall - (ends[-1] - ends[0])


def train_lt(python: str, spec: dict[str, Any], overhead_s: float, n_images: int, args: argparse.Namespace) -> dict:
    """LightlyTrain with Lightning's ``max_time`` at the budget less its start-up; the run's figures."""
    budget = args.minutes * 60
    spec = {**spec, "trainer_args": {**spec.get("trainer_args", {}), "max_time": {"seconds": int(budget - overhead_s)}}}
    load = os.getloadavg()[0]
    result, wall = run_lt(python, spec, budget + 120)  # the outer limit only catches a hang
    ends, per_step = result["step_ends_s"], spec["batch_size"]
    loop = ends[-1] - ends[0] if len(ends) > 1 else 0.0
    if not result["exported"]:
        raise RuntimeError(f"LightlyTrain wrote no export in {spec['out']}")
    return {
        "tool": f"LightlyTrain {result['version']}",
        "method": f"SimCLR, {result['optimizer']} lr {result['lr']:.2g}",
        "epochs": spec["epochs"],
        "steps": result["steps"],
        "images_seen": result["steps"] * per_step,
        "wall_s": wall,
        "img_s": (len(ends) - 1) * per_step / loop if loop > 0 else None,
        "stopped_at_budget": result["steps"] < spec["epochs"] * (n_images // per_step),
        "load_before": load,
        "lt_export": result["exported"],
        "lt_info": {k: result.get(k) for k in ("torch", "num_workers", "precision", "device", "weight_decay")},
    }


def lt_to_lvdkit(state_file: Path, cfg: PretrainConfig, target: Path) -> Path:
    """LightlyTrain's export (the timm model's state dict) as an lvdkit model file of the same timm model."""
    backbone, _, identity = build_backbone(cfg.model, cfg.crops.global_size, dict(cfg.model_kwargs))
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    head = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    ignore = sorted(k for k in set(state) - set(backbone.state_dict()) if k.rsplit(".", 1)[0] in heads)
    load_into(backbone, state, str(state_file), ignore=ignore)  # raises naming any other missing or extra key
    kept = len(state) - len(ignore)
    print(f"LightlyTrain export: {len(state)} tensors, {kept} match key for key, classifier {ignore} dropped")
    return save_lvdkit_model(backbone.eval(), cfg.model, identity, target)


# --- report -------------------------------------------------------------------------------------------------------


def markdown(rows: list[list[object]]) -> str:
    """A markdown table of HEADERS and ``rows`` (None as '-')."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if v < 1 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def scored(model: str, train: Labeled, test: Labeled, **kwargs: Any) -> dict[str, float]:
    s = evaluate(model, train, test, device="cpu", **kwargs)
    return {"knn_top1": s["knn_top1"], "linear_top1": s["linear_top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="a finished curation run")
    parser.add_argument("--heldout", type=Path, default=Path("out/demo-data/heldout"))
    parser.add_argument("--config", type=Path, default=Path("configs/simclr_cnn_demo.yaml"))
    parser.add_argument("--minutes", type=float, default=8.0, help="wall budget per tool (start-up, training, export)")
    parser.add_argument("--epochs", type=int, help="epochs for both (default: what each tool's probe fits)")
    parser.add_argument("--lt-python", default=DEFAULT_LT_PYTHON, help="Python of LightlyTrain's own venv")
    parser.add_argument("--lt-arg", action="append", default=[], help="KEY=JSON for lightly_train.pretrain")
    parser.add_argument("--startup-s", type=float, default=90.0, help="lvdkit: Ray start, first batch, export (s)")
    parser.add_argument("--lt-startup-s", type=float, default=30.0, help="LightlyTrain start-up with --epochs")
    parser.add_argument("--efficiency", type=float, default=0.85, help="lvdkit: pipeline img/s over the bare loop's")
    parser.add_argument("--probe-steps", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep the image folder, runs and exports here (default: temporary)")
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    parser.add_argument("overrides", nargs="*", help="key=value for the preset")
    args = parser.parse_args()
    if not lt_ready(args.lt_python):
        raise SystemExit(f"LightlyTrain not found at {args.lt_python}; install it in its own venv:\n  {LT_INSTALL}")
    extra = {}
    for item in args.lt_arg:
        key, _, raw = item.partition("=")
        try:
            extra[key] = json.loads(raw)
        except json.JSONDecodeError:
            extra[key] = raw
    overrides = list(args.overrides)
    cfg = load_config(PretrainConfig, args.config, overrides)
    if cfg.method != "simclr":
        parser.error(f"method={cfg.method}: this comparison runs SimCLR in both tools")
    timm_name(cfg.model)
    print(machine_line())
    print(" ".join(sys.argv), flush=True)
    train_set, test_set = split(load_labeled(args.heldout), 0.5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.update(LT_ENV)
    with tempfile.TemporaryDirectory(prefix="lvdkit-vs-lightlytrain-") as tmp:
        folder = args.keep or Path(tmp)
        os.environ["LIGHTLY_TRAIN_CACHE_DIR"] = str((folder / "lt-cache").resolve())
        n = write_folder(args.out / "curated", folder / "images")
        print(f"{n} curated images written to {folder / 'images'} for LightlyTrain", flush=True)
        lvd_epochs = args.epochs or lvdkit_epochs(cfg, n, args, device)
        lvd = train_lvdkit(cfg, overrides, folder / "lvdkit", lvd_epochs, args)
        print(
            f"lvdkit: {lvd['steps']} steps in {lvd['wall_s']:.0f} s (load before {lvd['load_before']:.1f})", flush=True
        )
        spec = lt_spec(cfg, folder / "images", folder / "lightlytrain", args.epochs or 1, extra)
        lt_epochs, overhead = args.epochs, args.lt_startup_s
        if lt_epochs is None:
            s_per_step, overhead = lt_probe(args.lt_python, spec, args.probe_steps)
            lt_epochs = max(1, int((args.minutes * 60 - overhead) / (s_per_step * (n // spec["batch_size"]))))
            print(f"LightlyTrain: {s_per_step:.3f} s/step, {overhead:.0f} s start-up probed -> {lt_epochs} epochs")
        lt = train_lt(args.lt_python, {**spec, "epochs": lt_epochs}, overhead, n, args)
        print(
            f"LightlyTrain: {lt['steps']} steps in {lt['wall_s']:.0f} s (load before {lt['load_before']:.1f})",
            flush=True,
        )
        lt["model_file"] = str(lt_to_lvdkit(Path(lt["lt_export"]), cfg, folder / "lightlytrain.safetensors"))
        for run in (lvd, lt):
            found = scored(run["model_file"], train_set, test_set) if run["model_file"] else {}
            run.update(model=cfg.model, knn_top1=found.get("knn_top1"), linear_top1=found.get("linear_top1"))
        pixels = knn_accuracy(raw_pixels(train_set), train_set.labels, raw_pixels(test_set), test_set.labels, 20, 0.07)
        size = cfg.crops.global_size
        init = scored(cfg.model, train_set, test_set, img_size=size, kwargs=cfg.model_kwargs)
    rows: list[list[object]] = [["raw pixels (28x28 grayscale)", "-", "-", "-", "-", "-", "-", "-", pixels, "-"]]
    rows.append(["random init", "-", cfg.model, "-", "-", "-", "-", "-", init["knn_top1"], init["linear_top1"]])
    for r in (lvd, lt):
        stop = " (stopped at budget)" if r["stopped_at_budget"] else ""
        rows.append([r["tool"], r["method"], r["model"], r["epochs"], r["images_seen"], r["steps"]])
        rows[-1] += [f"{r['wall_s']:.0f}{stop}", r["img_s"], r["knn_top1"], r["linear_top1"]]
    print(f"\n{n} curated images, {size} px, batch {cfg.optim.batch_size}, budget {args.minutes:g} min per tool")
    print(f"held-out: {len(train_set.labels)} train / {len(test_set.labels)} test; img/s: training loop, steps 2..N\n")
    print(markdown(rows))
    if args.json:
        report = {
            "machine": machine_line(),
            "command": sys.argv,
            "curated_images": n,
            "img_size": size,
            "batch_size": cfg.optim.batch_size,
            "budget_s": args.minutes * 60,
            "heldout": {"train": len(train_set.labels), "test": len(test_set.labels)},
            "raw_pixels_knn_top1": pixels,
            "random_init": {"model": cfg.model, **init},
            "runs": [{k: v for k, v in r.items() if k not in ("model_file", "lt_export")} for r in (lvd, lt)],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
