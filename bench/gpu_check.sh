#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) with lvdkit from this checkout's src/ on PYTHONPATH (no install needed).
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" "$ROOT/bench/gpu_check.py" "$@"
