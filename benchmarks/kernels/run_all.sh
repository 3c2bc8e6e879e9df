#!/usr/bin/env bash
# Every kernel benchmark in one command, on the GPU when one is usable (else the CPU), its output recorded under
# benchmarks/results/ with the device, the versions and the exact commands:
#     bash benchmarks/kernels/run_all.sh [--no-compile] [--repeats N]   # options go to every benchmark
# KERNELS_OUT=FILE writes the record there instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
out=${KERNELS_OUT:-"benchmarks/results/kernels-${device}-$(date -u +%Y%m%d-%H%M).md"}
mkdir -p "$(dirname "$out")"
{
  echo "# Kernel benchmarks on ${device}"
  echo
  python3 -c "import platform, torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}, {platform.processor() or platform.machine()}')"
  for bench in group_norm attention adaln_modulate timestep_embedding solver_step; do
    echo
    echo "## python benchmarks/kernels/bench_${bench}.py $*"
    echo '```'
    python3 "benchmarks/kernels/bench_${bench}.py" "$@"
    echo '```'
  done
} 2>&1 | tee "$out"
echo "recorded in $out"
