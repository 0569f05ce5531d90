#!/usr/bin/env bash
# The GPU figures the README still owes, in one run of under 10 minutes on one H100 / H200:
#   cuda-tests  tests/test_cuda.py: CUDA-graph decode == eager tokens, samplers and training jobs under bf16
#   bench       eval/bench.py: VAR-d16 / d30 and GPT-B / L (eager and CUDA graph), batch 1 / 16 / 64, bf16
#   fid-10k     eval/fid.py end to end on 10k samples of a random-weight VAR-d16 (bf16), scored with a
#               random-weight torch-fidelity Inception against 5k noise images (the machine is offline; the
#               pipeline's cost is the same as with the real Inception and reference)
# Usage: bash tools/gpu_checks.sh [OUT [STEP...]]   (OUT defaults to $OUT, else gpu-checks/; STEPs default to all
# three, in that order). Each step runs under its own time limit (seconds: CUDA_TESTS_S, BENCH_S, FID_S; together
# 570 by default, inside a device command's 600), logs to OUT/STEP.log and records its wall time and exit status
# in OUT/steps.txt; a failed or timed-out step does not stop the later ones. bench prints each row as it is
# measured, so a timed-out bench still leaves the rows it finished.
#
# On the lent offline GPU machine (its image has torch, torchvision, timm, einops, huggingface_hub, safetensors,
# scipy, pytest; not diffusers or torch-fidelity), carry the two missing pure-Python wheels, downloaded here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torch-fidelity==0.4.0
#   run (carry .whl):  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#                      PYTHONPATH=/tmp/site:$PWD bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-checks}}
shift $(( $# > 0 ? 1 : 0 ))
if [ $# -gt 0 ]; then steps=("$@"); else steps=(cuda-tests bench fid-10k); fi
for name in "${steps[@]}"; do
    case $name in cuda-tests|bench|fid-10k) ;; *) echo "unknown step $name; the steps are cuda-tests, bench, fid-10k" >&2; exit 2 ;; esac
done
scratch=$(mktemp -d)  # the 1.6 GB random pipeline, the Inception weights, the reference, the 10k PNGs
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
num_images=${NUM_IMAGES:-10000}

step() {  # step NAME SECONDS COMMAND...: run under `timeout`, log to OUT/NAME.log, record wall time and exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    local note=""; [ $status -eq 124 ] && note=" (timed out after $limit s)"
    echo "$name: exit $status, $((SECONDS - start)) s$note" | tee -a "$out/steps.txt"
}

make_fid_inputs() {  # the random VAR-d16 pipeline, the random Inception, 5k noise images as the reference
    python3 - "$scratch" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "tests")
from _fid_helpers import build_random_inception

from vartk.models.var import VARTransformer
from vartk.pipelines import VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE

scratch = Path(sys.argv[1])
torch.manual_seed(0)
with torch.device("cuda"):
    pipe = VARPipeline(tokenizer=MultiScaleVQVAE(), transformer=VARTransformer(depth=16))  # official init
pipe.save_pretrained(scratch / "var-d16-random")
build_random_inception(scratch / "inception-random.pth")
# more reference images than the 2048 feature dimensions, so the reference covariance has full rank
reference = np.random.default_rng(0).integers(0, 256, (5000, 256, 256, 3), dtype=np.uint8)  # [N, H, W, 3]
np.savez(scratch / "reference-noise.npz", arr_0=reference)
PY
}

run_fid() {
    make_fid_inputs || { echo "building the FID inputs failed"; return 1; }
    python3 eval/fid.py --model "$scratch/var-d16-random" --num-images "$num_images" --batch-size 100 \
        --dtype bfloat16 --reference "$scratch/reference-noise.npz" --inception-weights "$scratch/inception-random.pth" \
        --metrics fid,is --out "$scratch/fid-10k" || return
    cp "$scratch/fid-10k/results.json" "$out/fid-10k-results.json"
}

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks.sh: no CUDA device here')" \
    || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$out/device.txt" 2>&1
export -f make_fid_inputs run_fid
export scratch out num_images
for name in "${steps[@]}"; do
    case $name in
        cuda-tests) step cuda-tests "${CUDA_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
        bench) step bench "${BENCH_S:-210}" python3 eval/bench.py ;;
        fid-10k) step fid-10k "${FID_S:-270}" bash -c run_fid ;;
    esac
done
cat "$out/steps.txt"
