#!/usr/bin/env bash
# Does `pip install .[gpu]` leave exactly one Faiss, the GPU build, with its GPU entry points? No GPU needed.
#   1. resolve `.[gpu]` through constraints.txt in a clean venv (pip --dry-run --report): faiss-gpu-cu12 and no
#      faiss-cpu among what would be installed;
#   2. install that faiss-gpu-cu12 (and what it needs) into the clean venv and import it: StandardGpuResources,
#      index_cpu_to_gpu and GpuIndexFlatIP exist (get_num_gpus() is 0 on a machine without a GPU).
# Usage: deploy/check_gpu_install.sh   (downloads faiss-gpu-cu12 and its CUDA 12 libraries, about 1 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d /tmp/lvdkit-gpu-install.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" \
    -c constraints.txt '.[gpu]'
faiss=$(python3 - "$tmp/report.json" <<'PY'
import json, sys
names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
found = sorted(n for n in names if n.startswith("faiss"))
assert found == ["faiss-gpu-cu12"], f"pip install .[gpu] would install {found}, not exactly faiss-gpu-cu12"
print(f"faiss-gpu-cu12=={names['faiss-gpu-cu12']}")
PY
)
echo "resolved: $faiss (and no faiss-cpu)"
"$tmp/venv/bin/python" -m pip install -q "$faiss"
"$tmp/venv/bin/python" - <<'PY'
from importlib import metadata
import faiss
wheels = [d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("faiss")]
assert wheels == ["faiss-gpu-cu12"], wheels
for name in ("StandardGpuResources", "index_cpu_to_gpu", "GpuIndexFlatIP", "get_num_gpus"):
    assert hasattr(faiss, name), f"faiss {faiss.__version__} lacks {name}"
print(f"ok: one faiss ({wheels[0]} {faiss.__version__}), GPU entry points present, GPUs here: {faiss.get_num_gpus()}")
PY
