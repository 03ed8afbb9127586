"""``lvdkit export RUN --out FILE``: a run's backbone as a plain state dict that timm/torchvision load directly.

The file is safetensors with the library's own parameter names (no ``backbone.`` prefix, no head), plus a JSON
sidecar naming the model and its constructor kwargs, e.g. for a timm ViT::

    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, checkpoint_path="x.safetensors", **kwargs)

and ``create_embedder("x.safetensors")`` (so ``lvdkit embed``/``eval``, curation, and distillation teachers) reads it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lvdkit.core.storage import Location, ObjectPath, is_uri, location
from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.model_file import save_lvdkit_model, sidecar_path
from lvdkit.embeddings.weights import load_into
from lvdkit.pretrain.config import DEFAULT_WHICH
from lvdkit.pretrain.run import latest_checkpoint
from lvdkit.pretrain.train import read_checkpoint

STUDENT_ONLY = ("simclr", "distillation")


def export(
    run: str | Path, out: str | Path, which: str | None = None, checkpoint: str | Path | None = None
) -> Location:
    """Write the backbone of ``run``'s latest (or the given) checkpoint to ``out`` (``.safetensors`` + ``.json``).

    ``which``: ``teacher`` (DINOv2's and DINO's EMA teacher, their default) or ``student`` (SimCLR's and
    distillation's only choice). ``run``, ``checkpoint`` and ``out`` may be on object storage (``s3://...``).
    """
    folder = location(checkpoint) if checkpoint else latest_checkpoint(run)
    state, meta = read_checkpoint(folder)
    which = which or DEFAULT_WHICH[meta["method"]]
    if meta["method"] in STUDENT_ONLY and which != "student":
        raise ValueError(f"which={which!r}: a {meta['method']} run exports its student (valid: 'student')")
    if which not in ("teacher", "student"):
        raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
    prefix = f"{which}.backbone."
    weights = {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{folder}: no {which} backbone weights in this checkpoint")
    identity: dict[str, Any] = dict(meta["identity"])
    img_size = identity.pop("img_size", None)
    module, _ = create_torch_model(meta["model"], img_size=img_size, pretrained=False, **identity)
    load_into(module, weights, str(folder))
    kwargs = {**identity, **({"img_size": img_size} if img_size is not None else {})}
    where = str(run) if is_uri(run) else str(Path(run).resolve())
    provenance = {"run": where, "checkpoint": folder.name, "step": meta["step"], "which": which}
    with tempfile.TemporaryDirectory(prefix="lvdkit-export-") as tmp:  # a URI: written and checked here, uploaded
        local = Path(tmp) / Path(str(out)).name if is_uri(out) else Path(out)
        path = save_lvdkit_model(module, meta["model"], kwargs, local)
        path.with_suffix(".provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if not is_uri(out):
            return path
        target = ObjectPath(str(out))
        for name in (path.name, sidecar_path(path).name, path.with_suffix(".provenance.json").name):
            (target.parent / name).write_bytes((path.parent / name).read_bytes())
    return target
