#!/usr/bin/env bash
# The GPU checks and figures, as one script that fits a short GPU lease (BUDGET seconds, default 400): the CUDA tests,
# then `blitzdiff bench` (whole-loop graph against diffusers eager on the embedded models), the end-to-end benchmark
# suite's GPU cases (SD1.5 fp16 with guidance 7.5, DiT-XL/2-256 fp16 at batch 128; each output checked against
# diffusers), the kernel benchmarks and a profile. Each step gets what is left of the budget (capped), most important
# first; a step that fails or runs out is recorded and the next one still runs.
#     BUDGET=400 bash benchmarks/gpu_check.sh [RESULTS_DIR]
# RESULTS_DIR defaults to benchmarks/results/gpu-<device>-<date>; everything a step prints goes to log.txt there.
# On a machine without a package index, carry the wheels it lacks in .whl/ (diffusers, importlib_metadata) and,
# optionally, a prebuilt extension for its Python in .gpu/_C.<abi>.so; else the extension is built here (sm_90).
set -uo pipefail  # not -e: one failing step is recorded and the next still runs
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${BUDGET:-400}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')" || exit 2
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/gpu-${device}-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
log="$out/log.txt"

step() {  # step NAME CAP COMMAND...: run with min(CAP, what the budget leaves) seconds, log it, record the status
  local name=$1 cap=$2 left=$((budget - ($(date +%s) - start)))
  shift 2
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then echo "$name skipped (budget spent)" | tee -a "$out/status.txt"; return; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name exit $rc in $(($(date +%s) - t0))s" | tee -a "$out/status.txt" "$log"
}

setup() {  # the carried wheels, the repository on the path, the extension (prebuilt or built now) in blitzdiff/
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__)"
  local abi
  abi=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ -f ".gpu/_C$abi" ]; then cp ".gpu/_C$abi" blitzdiff/; fi
  if ! python3 -c "import blitzdiff._C as c, sys; sys.exit(0 if c.has_cuda else 1)"; then
    echo "no usable prebuilt extension: building it (sm_90)"
    CUDAARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/blitzdiff-build . &&
      cp /tmp/blitzdiff-build/blitzdiff/_C*.so blitzdiff/
  fi
  python3 -c "import blitzdiff._C as c, diffusers; assert c.has_cuda; print('extension with CUDA; diffusers',
diffusers.__version__)"
}

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >> "$log" 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "== setup" | tee -a "$log"
setup >> "$log" 2>&1
echo "setup exit $?" | tee -a "$out/status.txt" "$log"
# Every `cuda` test but the benchmark suite's (timed below), 8 processes (Triton's compiles are CPU-bound).
step cuda-tests 170 python3 -m pytest -q -m cuda -n 8 --timeout 150 -p no:cacheprovider -W ignore \
  tests/kernels tests/engine/test_runtime.py tests/engine/test_threads.py tests/models/test_checkpoint.py \
  tests/test_profiling.py
bench() { step "$1" "$2" python3 -m blitzdiff bench --device cuda --json "$out/$1.json" "${@:3}"; }
# The embedded models: the whole-loop graph against diffusers' eager loop (target >= 10x).
bench dit-digits 60 --model dit-digits --sampler dpmpp_2m --modes eager step graph --batches 1 64 \
  --steps 20 --baseline diffusers
bench unet-digits 60 --model unet-digits --sampler ddim --modes eager step graph --batches 1 64 \
  --steps 20 --baseline diffusers
# SD1.5 UNet fp16 + CFG 7.5 (target < 9.5 ms per step) and DiT-XL/2-256 fp16 at batch 128 (target > 50% MFU), each
# system's output checked against the other implementation; pytest-benchmark's JSON holds ms/step and TFLOP/s.
step presets 150 python3 -m pytest -q -m cuda -p no:cacheprovider -W ignore benchmarks/test_bench_sampling.py \
  --benchmark-json "$out/bench-suite.json" --benchmark-columns=median,iqr,min,max,rounds
# The networks' fused kernels end to end (graph mode, `--kernels auto` against the presets' `ref` runs above); the
# tables go to log.txt only (the files that come back from a lease are few).
step sd15-kernels-auto 60 python3 -m blitzdiff bench --device cuda --model sd15-unet --dtype float16 --guidance 7.5 \
  --sampler ddim --modes graph --batches 1 --steps 20 --repeats 5 --baseline none --kernels auto
step dit-xl-kernels-auto 60 python3 -m blitzdiff bench --device cuda --model dit-xl-2-256 --dtype float16 \
  --guidance 1 --sampler ddim --modes graph --batches 128 --steps 4 --throughput-steps 4 --repeats 5 --baseline none --kernels auto
# Where DiT-XL/2's step goes (the preset's batch 128, `ref` kernels): the op table is in log.txt.
step profile-dit-xl 50 python3 -m blitzdiff profile --model dit-xl-2-256 --device cuda --dtype float16 --guidance 1 \
  -n 128 --steps 2 --json "$out/dit-xl-profile.json" --trace /tmp/dit-xl-trace.json
step profile-sd15 40 python3 -m blitzdiff profile --model sd15-unet --device cuda --dtype float16 --guidance 7.5 \
  --steps 4 --json "$out/sd15-profile.json" --trace /tmp/sd15-trace.json
step kernels 90 env KERNELS_OUT="$out/kernels.md" bash benchmarks/kernels/run_all.sh --no-compile --repeats 20
echo "results in $out ($(($(date +%s) - start))s)"
cat "$out/status.txt"
