#!/usr/bin/env bash
# The prepared GPU run (see the project's GPU.md): versions, the CUDA-marked correctness
# tests, then every kernel against its anchor; a table is printed last and the JSON, the logs
# and the versions land in OUT_DIR.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#   --dry-run: the same steps on a CPU (a quick subset of the tests, toy sizes through the
#   Triton interpreter), so that CI can check the script itself.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]}"
mode="${2:-}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0

{
    nvidia-smi || echo "nvidia-smi: not available"
    python3 -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
} 2>&1 | tee "$out/versions.txt"

if [ "$mode" = "--dry-run" ]; then
    tests=(tests/test_kernel_segment_attention.py -k "threshold or w33-fp32")
else
    tests=(tests -m gpu)
fi
python3 -m pytest -x -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/tests.log" || status=1
python3 benchmarks/gpu_kernels.py "$out" $mode 2>&1 | tee "$out/benchmarks.log" || status=1
exit $status
