#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on one H200; the stages' time limits add up to
# under 8): for a machine with a CUDA build of PyTorch (2.11 tested for, Python 3.12), no
# network and none of this project's other packages. With this workplace's device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
#   1. installs diffusers from the wheel carried in .whl/ and this project with --no-deps
#      (into /tmp/site; nothing else is needed to train: torch, numpy, pillow, tqdm,
#      safetensors, huggingface-hub and pytest are on the machine);
#   2. runs the GPU tests (tests/test_gpu.py, marked gpu) and the device and training tests
#      (run.device = "auto" puts the training tests on the GPU there);
#   3. runs benchmarks/gpu_throughput.py (the paper's setting at c = 0.6), eager and compiled;
#   4. trains the paper's setting (128x128, the paper UNet, batch 150, 3 hospitals, c = 0.6)
#      for EPOCHS epochs (default 5) and keeps its metrics, sample grids and server weights.
#
# Data: the bundled data/lgg_flair_128.npz (33 MB, data/README.md). Where a checkout lacks it,
# the script makes a stand-in from the bundled 32x32 file upsampled to 128x128 (same hospitals
# and counts: the timings hold, the samples look blurred) and says so.
#
# Everything worth keeping goes to $OUT (default out/gpu-check): log.txt (all output),
# benchmark.txt, and paper-c0.6/{metrics.jsonl, summary.json, server_model.safetensors,
# samples/<hospital>.png}. The run's full checkpoint (about 130 MB: four models and their Adam
# states) stays in /tmp/collafuse-paper-run.
#
#   bash scripts/gpu_check.sh      # from the repository root; EPOCHS=3 bash ... for less
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-check}"
EPOCHS="${EPOCHS:-5}"
PY="${PYTHON:-python3}"
RUN=/tmp/collafuse-paper-run
mkdir -p "$OUT/paper-c0.6/samples"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 COLLAFUSE_TRACEBACK=1
failed=()
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"

stage "install: .whl/*.whl and the project, --no-deps, into /tmp/site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || failed+=("install wheels")
export PYTHONPATH=/tmp/site
# setuptools of the machine builds the project (no build isolation: nothing can be fetched);
# if that fails, src/ on the path is the same code
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target /tmp/site . || export PYTHONPATH="$PWD/src:/tmp/site"
"$PY" -c "import collafuse, diffusers; print('collafuse from', collafuse.__file__, '| diffusers', diffusers.__version__)" \
    || { echo "collafuse does not import: stopping"; exit 1; }

DATA=data/lgg_flair_128.npz
if [ ! -f "$DATA" ]; then
    stage "data: $DATA missing; making a stand-in from data/lgg_flair_32.npz at 128x128"
    DATA=/tmp/lgg_flair_128_from32.npz
    "$PY" -m collafuse.cli data prepare data/lgg_flair_32.npz "$DATA" --size 128 \
        || failed+=("stand-in data")
fi

stage "tests: gpu-marked, device, training"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_device.py \
    tests/test_training.py || failed+=("tests")

stage "benchmark: benchmarks/gpu_throughput.py, eager"
timeout 100 "$PY" benchmarks/gpu_throughput.py --set "data.path=\"$DATA\"" \
    | tee "$OUT/benchmark.txt" || failed+=("benchmark")

stage "benchmark: benchmarks/gpu_throughput.py --compile"
timeout 120 "$PY" benchmarks/gpu_throughput.py --set "data.path=\"$DATA\"" --compile \
    --warmup 60 | tee -a "$OUT/benchmark.txt" || failed+=("benchmark --compile")

stage "paper setting at c = 0.6, $EPOCHS epochs"
rm -rf "$RUN"
if timeout 90 "$PY" -m collafuse.cli train configs/paper.toml --out "$RUN" --device cuda \
        --set "data.path=\"$DATA\"" --set diffusion.cut_ratio=0.6 --set "train.epochs=$EPOCHS" \
        --set train.checkpoint_every=1000; then
    cp "$RUN/metrics.jsonl" "$RUN/summary.json" "$OUT/paper-c0.6/"
    cp "$RUN"/samples/*.png "$OUT/paper-c0.6/samples/"
    "$PY" - "$RUN" "$OUT/paper-c0.6/server_model.safetensors" <<'EOF' || failed+=("weights")
import sys
from safetensors.torch import save_file
from collafuse.state import load_state
model = load_state(f"{sys.argv[1]}/checkpoint.pt")["server"]["model"]
save_file({k: v.contiguous() for k, v in model.items()}, sys.argv[2])
EOF
    "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print('rounds', s['rounds'], '| seconds per party', {k: round(v, 1) for k, v in s['seconds'].items()})" "$RUN/summary.json"
else
    failed+=("paper run")
fi

stage "done"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all stages passed"
