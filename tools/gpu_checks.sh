#!/usr/bin/env bash
# Every GPU figure vartk's docs report, in prepared runs of under 10 minutes on one H100 / H200:
#   cuda-tests   tests/test_cuda.py: CUDA-graph decode and window (verify) steps == eager, plain and speculative
#                samplers and training jobs under bf16
#   bench        eval/bench.py: VAR-d16 / d30 and GPT-B / L (eager and CUDA graph), batch 1 / 16 / 64, bf16
#   speculative  GPT-B and GPT-L (random weights, bf16) at batch 1 / 16 / 64: plain vs SJD vs coupled SJD vs GSD,
#                wall-clock and transformer forwards per image (the cost of verifying a window on a GPU)
#   scalekv      VAR-d30 @256 and VAR-d36 @512 (random weights, bf16): the largest batch that runs, its KV GiB,
#                peak GiB and img/s, for the full cache and ScaleKV at 10 % (uniform budgets)
#   fid-10k      eval/fid.py end to end on 10k samples of a random-weight VAR-d16 (bf16), scored with a random-weight
#                torch-fidelity Inception against 5k noise images (the machine is offline; the pipeline's cost is
#                the same as with the real Inception and reference)
# Usage: bash tools/gpu_checks.sh [OUT [STEP...]]   (OUT defaults to $OUT, else gpu-checks/). The default steps,
# cuda-tests bench speculative scalekv, fit one device command (their limits add up to 570 s); run fid-10k as a
# second command (270 s): bash tools/gpu_checks.sh OUT fid-10k. Each step runs under its own time limit (seconds:
# CUDA_TESTS_S, BENCH_S, SPECULATIVE_S, SCALEKV_S, FID_S), logs to OUT/STEP.log and records its wall time and exit
# status in OUT/steps.txt; a failed or timed-out step does not stop the later ones, and the benches print each row
# as it is measured, so a timed-out step still leaves the rows it finished.
# GPU_CHECKS_SMOKE=1 runs every step on the CPU with tiny models in a minute or two (tests/test_gpu_checks.py does,
# so the script cannot rot); its numbers mean nothing.
#
# On the lent offline GPU machine (its image has torch, torchvision, timm, einops, huggingface_hub, safetensors,
# scipy, pytest; not diffusers, torch-fidelity or matplotlib), carry the missing wheels, downloaded here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 matplotlib
#   run (carry .whl):  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#                      PYTHONPATH=/tmp/site:$PWD bash tools/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-checks}}
shift $(( $# > 0 ? 1 : 0 ))
if [ $# -gt 0 ]; then steps=("$@"); else steps=(cuda-tests bench speculative scalekv); fi
for name in "${steps[@]}"; do
    case $name in cuda-tests|bench|speculative|scalekv|fid-10k) ;;
        *) echo "unknown step $name; the steps are cuda-tests, bench, speculative, scalekv, fid-10k" >&2; exit 2 ;;
    esac
done
smoke=${GPU_CHECKS_SMOKE:-0}
scratch=$(mktemp -d)  # the random pipeline, the Inception weights, the reference, the sampled PNGs
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$smoke" = 1 ]; then  # tiny models on the CPU: the same commands, seconds each
    device=(--device cpu --tiny --repeats 1)
    gpt_models=(--only GPT-tiny) var_models=(--only VAR-tiny) batches=(--batches 1 2) max_batch=(--max-batch-cap 4)
    num_images=${NUM_IMAGES:-8} fid_model=tiny
else
    device=()
    gpt_models=(--only GPT-B GPT-L) var_models=(--only VAR-d30 VAR-d36) batches=(--batches 1 16 64) max_batch=()
    num_images=${NUM_IMAGES:-10000} fid_model=var-d16
fi

step() {  # step NAME SECONDS COMMAND...: run under `timeout`, log to OUT/NAME.log, record wall time and exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    local note=""; [ $status -eq 124 ] && note=" (timed out after $limit s)"
    echo "$name: exit $status, $((SECONDS - start)) s$note" | tee -a "$out/steps.txt"
}

make_fid_inputs() {  # a random VAR pipeline (d16, or tiny), the random Inception, noise images as the reference
    python3 - "$scratch" "$fid_model" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "tests")
from _fid_helpers import build_random_inception

from vartk.models.var import VARTransformer
from vartk.pipelines import VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE

scratch, which = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
device = "cuda" if which == "var-d16" else "cpu"
with torch.device(device):
    if which == "var-d16":  # the official init
        pipe = VARPipeline(tokenizer=MultiScaleVQVAE(), transformer=VARTransformer(depth=16))
    else:
        pipe = VARPipeline(tokenizer=MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8,
                                                     vocab_size=64, norm_groups=8),
                           transformer=VARTransformer(depth=2, width=64, num_heads=2, vocab_size=64, latent_channels=8))
pipe.save_pretrained(scratch / "var-random")
build_random_inception(scratch / "inception-random.pth")
# more reference images than the 2048 feature dimensions, so the reference covariance has full rank
count, size = (5000, 256) if which == "var-d16" else (16, 32)
reference = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)  # [N, H, W, 3]
np.savez(scratch / "reference-noise.npz", arr_0=reference)
PY
}

run_fid() {
    make_fid_inputs || { echo "building the FID inputs failed"; return 1; }
    local precision=(--dtype bfloat16); [ "$smoke" = 1 ] && precision=(--dtype float32)
    python3 eval/fid.py --model "$scratch/var-random" --num-images "$num_images" --batch-size 100 "${precision[@]}" \
        --reference "$scratch/reference-noise.npz" --inception-weights "$scratch/inception-random.pth" \
        --metrics fid,is --out "$scratch/fid-10k" || return
    cp "$scratch/fid-10k/results.json" "$out/fid-10k-results.json"
}

if [ "$smoke" != 1 ]; then
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks.sh: no CUDA device here')" \
        || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
fi
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$out/device.txt" 2>&1
export -f make_fid_inputs run_fid
export scratch out num_images fid_model smoke
for name in "${steps[@]}"; do
    case $name in
        cuda-tests) step cuda-tests "${CUDA_TESTS_S:-75}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
        bench) step bench "${BENCH_S:-150}" python3 eval/bench.py "${device[@]}" ;;
        speculative) step speculative "${SPECULATIVE_S:-135}" python3 eval/bench.py "${device[@]}" "${gpt_models[@]}" \
            "${batches[@]}" --sampler nexttoken --sampler sjd --sampler sjd:coupled=true \
            --sampler gsd:embedding=transformer --json "$out/speculative.json" ;;
        scalekv) step scalekv "${SCALEKV_S:-210}" python3 eval/bench.py "${device[@]}" "${var_models[@]}" --max-batch \
            --batches 64 "${max_batch[@]}" --kv-cache full --kv-cache scalekv:budget=0.1,calibration=uniform \
            --json "$out/scalekv.json" ;;
        fid-10k) step fid-10k "${FID_S:-270}" bash -c run_fid ;;
    esac
done
cat "$out/steps.txt"
