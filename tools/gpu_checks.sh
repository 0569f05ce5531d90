#!/usr/bin/env bash
# The GPU figures the README still owes, in one run of about 10 minutes on one H100 / H200:
#   1. tests/test_cuda.py: CUDA-graph decode == eager tokens, samplers and training jobs under bf16 on the GPU
#   2. eval/bench.py: VAR-d16 / d30 and GPT-B / L (eager and CUDA graph), batch 1 / 16 / 64, bf16
#   3. eval/fid.py end to end on 10k samples of a random-weight VAR-d16 (bf16), scored with a random-weight
#      torch-fidelity Inception (the machine is offline; the pipeline's cost is the same as with the real one)
# Usage: bash tools/gpu_checks.sh [OUT]   (OUT defaults to $OUT, else gpu-checks/); each step's log and wall
# time land in OUT, and a failed step does not stop the later ones.
#
# On the lent offline GPU machine (its image has torch, torchvision, timm, einops, huggingface_hub, safetensors;
# not diffusers or torch-fidelity), carry the three missing pure-Python wheels, downloaded here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 importlib-metadata==10.2.0
#   run (carry .whl):  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#                      PYTHONPATH=/tmp/site:$PWD bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-checks}}
scratch=$(mktemp -d)  # the 1.6 GB random pipeline, the Inception weights, the reference, the 10k PNGs
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
num_images=${NUM_IMAGES:-10000}

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record the wall time and exit status
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks.sh: no CUDA device here')" \
    || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$out/device.txt" 2>&1
step cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step bench python3 eval/bench.py
python3 - "$scratch" <<'EOF'
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
transformer = VARTransformer(depth=16)
transformer.init_weights()
VARPipeline(tokenizer=MultiScaleVQVAE(), transformer=transformer).save_pretrained(scratch / "var-d16-random")
build_random_inception(scratch / "inception-random.pth")
reference = np.random.default_rng(0).integers(0, 256, (2000, 256, 256, 3), dtype=np.uint8)  # [N, H, W, 3]
np.savez(scratch / "reference-noise.npz", arr_0=reference)
EOF
step fid-10k python3 eval/fid.py --model "$scratch/var-d16-random" --num-images "$num_images" --batch-size 100 \
    --dtype bfloat16 --reference "$scratch/reference-noise.npz" --inception-weights "$scratch/inception-random.pth" \
    --metrics fid,is --out "$scratch/fid-10k"
cp "$scratch/fid-10k/results.json" "$out/fid-10k-results.json"
cat "$out/steps.txt"
