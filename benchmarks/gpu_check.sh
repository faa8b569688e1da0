#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, in one script for a bare CUDA machine with this
# repository copied in (about 8 minutes on one H100).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu-results
#
# What it needs there: a python3 whose torch sees a CUDA device (the image's own), and this
# project's other dependencies at their locked versions. It makes a venv over the system's
# packages (so the image's CUDA torch stays) and installs requirements.lock without torch:
# from PyPI when the machine reaches it, else from wheels in ./.whl (made beforehand on a
# machine that reaches PyPI: `pip download --no-deps -d .whl -r requirements.lock` with the
# target's --python-version and --platform; docs/BENCHMARKS.md has the command).
#
# It writes into OUT_DIR: env.txt (card, driver, versions), cuda-tests.txt (the CUDA-marked
# tests), mixed-batch-{small,paper}.json, serving-compute-{small,paper}.txt and
# continuous-{small,paper}.json (continuous vs static scheduling), step-overhead-small.{json,txt}
# (host time per engine step outside the forward at 1-128 rows, overlap off),
# step-overhead-overlap-{off,on}.{json,txt} (the mean step time with and without overlap
# scheduling: what overlap buys), and log.txt (everything). The CUDA-marked tests include the
# engine's tokens on the GPU with overlap on and off.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1
started=$(date +%s)
step() { echo "== $(($(date +%s) - started)) s: $*"; }

step "environment"
PY=python3
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to $PY's torch: nothing to check"; exit 2
fi
$PY -m venv --system-site-packages .venv-gpu
VPY=.venv-gpu/bin/python
grep -Ev '^(torch|triton|nvidia-)' requirements.lock > "$OUT_DIR/requirements-no-torch.txt"
if [ -d .whl ]; then
    $VPY -m pip install -q --no-index --find-links .whl -r "$OUT_DIR/requirements-no-torch.txt"
else
    $VPY -m pip install -q -r "$OUT_DIR/requirements-no-torch.txt"
fi
$VPY -m pip install -q --no-deps --no-build-isolation -e . || $VPY -m pip install -q --no-deps -e .
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $VPY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)); print("transformers", transformers.__version__)'
    nproc
} | tee "$OUT_DIR/env.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step "CUDA-marked tests"
timeout 180 $VPY -m pytest -q -m cuda tests -p no:cacheprovider 2>&1 | tee "$OUT_DIR/cuda-tests.txt"

for preset in small paper; do
    step "mixed-batch forward, $preset"
    timeout 120 $VPY -m benchmarks.mixed_batch --preset "$preset" --device cuda \
        --out "$OUT_DIR/mixed-batch-$preset.json" || echo "mixed_batch $preset: exit $?"
    step "serving compute-only, $preset"
    timeout 120 $VPY -m benchmarks.serving --compute-only --preset "$preset" --device cuda \
        --out "$OUT_DIR/serving-compute-$preset.json" > "$OUT_DIR/serving-compute-$preset.txt" 2>&1 \
        || echo "serving compute-only $preset: exit $?"
    step "continuous vs static, $preset"
    timeout 150 $VPY -m benchmarks.continuous --quick --preset "$preset" --device cuda \
        --out "$OUT_DIR/continuous-$preset.json" --plot "$OUT_DIR/continuous-$preset.png" \
        || echo "continuous $preset: exit $?"
done
step "host time per step outside the forward, small (device-synchronised timings)"
CTXPEFT_SYNC_TIMING=1 timeout 150 $VPY -m benchmarks.step_overhead --preset small \
    --device cuda --overlap off --rows 1,8,32,128 --seconds 4 \
    --out "$OUT_DIR/step-overhead-small.json" \
    > "$OUT_DIR/step-overhead-small.txt" 2>&1 || echo "step_overhead: exit $?"
for overlap in off on; do
    step "overlap $overlap: mean step time, small (no synchronisation but the token read)"
    timeout 150 $VPY -m benchmarks.step_overhead --preset small --device cuda \
        --overlap "$overlap" --rows 8,32,128 --seconds 4 \
        --out "$OUT_DIR/step-overhead-overlap-$overlap.json" \
        > "$OUT_DIR/step-overhead-overlap-$overlap.txt" 2>&1 || echo "overlap $overlap: exit $?"
done
step "done"
