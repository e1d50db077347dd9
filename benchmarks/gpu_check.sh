#!/usr/bin/env bash
# Everything vledge does on an NVIDIA GPU, in one call, results in one folder (about 5-8 minutes).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu_check_results)
#
# Works without network access. It needs a Python (PYTHON, default python3) that already has the
# project's dependencies (torch, torchvision, pillow, onnx, onnxruntime, tokenizers,
# opencv-python-headless, click, tqdm, safetensors, pytest; matplotlib only for the charts); a
# virtual environment made with --system-site-packages gets vledge itself (editable, no
# dependencies, no build isolation) and every wheel in wheels/ (no dependencies). If that Python's
# onnxruntime has no CUDA provider, or a package is missing, download the wheels beforehand on a
# machine with network, for that machine's Python version, e.g.
#
#   pip download onnxruntime-gpu==1.31.1 --no-deps -d wheels/
#   pip download torchvision==0.26.0 pillow --no-deps -d wheels/     # only if missing; match torch
#
# Steps, each logged to OUT_DIR/<step>.log: the GPU (nvidia-smi), the install, a check that a CUDA
# session really starts (the script stops with a clear message if not), a small model trained and
# exported on the GPU (synthetic data), the CUDA tests, strict placement of fp32 and fp16, and
# `vledge bench --providers cuda` (ort-cuda-fp32 and ort-cuda-fp16: IO binding keeps the cache on
# the device) beside PyTorch. OUT_DIR/summary.md collects the results.
set -uo pipefail

OUT="${1:-gpu_check_results}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.gpu-venv}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
started=$(date +%s)

fail() { echo "gpu_check: $*" | tee -a "$OUT/summary.md" >&2; exit 1; }
step() { echo "== $1 ($(( $(date +%s) - started )) s)" | tee -a "$OUT/summary.md"; }

: > "$OUT/summary.md"
step "GPU"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || fail "nvidia-smi failed: no NVIDIA GPU or driver here (see $OUT/nvidia-smi.txt)"
head -n 15 "$OUT/nvidia-smi.txt" >> "$OUT/summary.md"

step "install"
{
  "$PYTHON" -m venv --system-site-packages "$VENV" &&
  "$VENV/bin/python" -m pip install --no-deps --no-build-isolation --no-index -e . &&
  if ls wheels/*.whl > /dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --no-deps --no-index --force-reinstall wheels/*.whl
  fi
} > "$OUT/install.log" 2>&1 || fail "install failed (see $OUT/install.log)"
PY="$VENV/bin/python"
VLEDGE="$VENV/bin/vledge"
missing=$("$PY" - <<'EOF'
import importlib.util
modules = ["torch", "torchvision", "PIL", "onnx", "onnxruntime", "tokenizers", "cv2", "click", "tqdm",
           "safetensors", "pytest"]
print(" ".join(m for m in modules if importlib.util.find_spec(m) is None))
EOF
)
[ -z "$missing" ] || fail "missing Python packages: $missing (put their wheels in wheels/, see the top of this script)"

# onnxruntime-gpu finds CUDA and cuDNN through the loader path; torch's wheels bring them as nvidia-* packages.
NVIDIA_LIBS=$("$PY" - <<'EOF'
import glob, os, site
paths = []
for root in site.getsitepackages():
    paths += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(paths))
EOF
)
export LD_LIBRARY_PATH="${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "CUDA provider"
"$PY" - > "$OUT/cuda_provider.log" 2>&1 <<'EOF'
import sys
import onnxruntime as ort
from vledge.runtime import gpu_status
print("onnxruntime", ort.__version__, ort.get_available_providers())
status = gpu_status("CUDAExecutionProvider")
print(status)
sys.exit(0 if status.usable else 1)
EOF
status=$?
cat "$OUT/cuda_provider.log" >> "$OUT/summary.md"
[ $status -eq 0 ] || fail "no usable CUDA provider: install onnxruntime-gpu (put its wheel in wheels/, see the top of this script); ONNX Runtime said: $(tail -n 1 "$OUT/cuda_provider.log")"

step "model (synthetic data, small preset, trained and exported on the GPU)"
WORK="$OUT/work"
{
  "$VLEDGE" data synth --out "$WORK/data" --size 1500 --force &&
  "$VLEDGE" train --data "$WORK/data" --preset small --out "$WORK/run" --max-steps 300 --device cuda &&
  "$VLEDGE" export "$WORK/run/ckpt.pt" -o "$WORK/model" --quantize fp16,int8 --calibration-data "$WORK/data" \
      --parity-samples 64 --force
} > "$OUT/model.log" 2>&1 || fail "training or export failed (see $OUT/model.log)"
tail -n 8 "$OUT/model.log" >> "$OUT/summary.md"

step "CUDA tests"
timeout 300 "$PY" -m pytest -q -rs tests/test_runtime.py tests/test_run_options.py tests/test_export_quantize.py \
    -k "cuda or gpu or placement or strict or fp16 or provider or binding" \
    --junitxml "$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1
echo "pytest exit status $?" >> "$OUT/summary.md"
tail -n 15 "$OUT/cuda_tests.log" >> "$OUT/summary.md"

step "strict placement, fp32 and fp16"
"$PY" - "$WORK/model" > "$OUT/placement.json" 2> "$OUT/placement.log" <<'EOF'
import json, sys
import numpy as np
from vledge.runtime import load
out = {}
for precision in ("fp32", "fp16"):
    try:
        model = load(sys.argv[1], precision=precision, providers="cuda", strict=True)
        size = model.manifest.preprocess.image_size
        image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
        model.caption(image)
        out[precision] = {"info": model.info(), "placement": model.placement(), "strict": "passed"}
    except Exception as exc:
        out[precision] = {"strict": f"failed: {type(exc).__name__}: {exc}"}
print(json.dumps(out, indent=1, default=str))
EOF
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); [print(f'{p}: strict placement {v[\"strict\"]}') for p, v in d.items()]" \
    "$OUT/placement.json" >> "$OUT/summary.md" 2>&1

step "vledge bench --providers cuda"
timeout 300 "$VLEDGE" bench --ckpt "$WORK/run/ckpt.pt" --model "$WORK/model" --data "$WORK/data" --providers cuda \
    --threads 1 --batch 1,8 --repeats 10 --parity-samples 64 --no-cold-start --out "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
echo "bench exit status $?" >> "$OUT/summary.md"
[ -f "$OUT/bench/bench.md" ] && cat "$OUT/bench/bench.md" >> "$OUT/summary.md"

step "done"
echo "results in $OUT (summary.md)"
