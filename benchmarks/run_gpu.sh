#!/usr/bin/env bash
# The GPU checks and figures issue 5 owes, as one script for a GPU session (about 10 minutes on an H100): the CUDA
# tests, then `blitzdiff bench` on the embedded models and the random-weight presets against diffusers, each run's
# JSON (device, versions, exact command inside) and plots written under benchmarks/results/gpu-<device>-<date>/.
#     bash benchmarks/run_gpu.sh            # everything
#     bash benchmarks/run_gpu.sh tests      # the CUDA tests only
set -uo pipefail  # not -e: one failing step is recorded and the next still runs
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')" || exit 2
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out="benchmarks/results/gpu-${device}-$(date -u +%Y%m%d-%H%M)"
mkdir -p "$out"
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, record the status
  echo "== $1: ${*:2}"
  "${@:2}" > "$out/$1.log" 2>&1
  echo "$1 exit $?" | tee -a "$out/status.txt"
}
step cuda-tests python -m pytest -q -m cuda tests benchmarks --benchmark-disable
[ "${1:-all}" = tests ] && exit 0
bench() { step "$1" blitzdiff bench --device cuda --json "$out/$1.json" --plots "$out" "${@:2}"; }
# The embedded models: the whole-loop graph against diffusers eager (target: >= 10x).
bench unet-digits --model unet-digits --sampler ddim --modes eager compile step graph --batches 1 16 64 \
      --baseline diffusers diffusers-compile
bench dit-digits --model dit-digits --sampler dpmpp_2m --modes eager graph --batches 1 16 64 --baseline diffusers
# SD1.5 UNet, 64x64 latents, 77 tokens, CFG batch 2 (one guided image): target < 9.5 ms per step.
bench sd15-fp16 --model sd15-unet --dtype float16 --guidance 7.5 --sampler ddim --modes eager compile graph \
      --batches 1 --steps 20 --baseline diffusers diffusers-compile --channels-last
# DiT-XL/2 256 at large batch: target > 50% MFU (0.237 TFLOP per image per step, fp16 dense peak of the card).
bench dit-xl-256-fp16 --model dit-xl-2-256 --dtype float16 --sampler ddim --modes eager graph --batches 32 128 \
      --steps 20 --baseline diffusers
step profile-sd15 blitzdiff profile --model sd15-unet --device cuda --dtype float16 --guidance 7.5 --steps 4 \
      --trace "$out/sd15-trace.json" --json "$out/sd15-profile.json"
step kernels bash benchmarks/kernels/run_all.sh
echo "results in $out"; cat "$out/status.txt"
