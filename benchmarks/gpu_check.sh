#!/usr/bin/env bash
# The prepared GPU run (see the project's GPU.md): versions, the CUDA-marked correctness
# tests, every kernel against its anchor (gpu_kernels.py), then the topology paths:
# FlexAttention with the block mask against SDPA with the additive mask, and the CogVideoX
# attention processor (gpu_topology.py). Each prints a table last; the JSON, the logs and
# the versions land in OUT_DIR.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#   --dry-run: the same steps on a CPU (a quick subset of the tests, toy sizes through the
#   Triton interpreter), so that CI can check the script itself.
# Environment:
#   PYTHON: the interpreter every step runs (default: python3 on PATH).
#   GPU_CHECK_EXTRA_TESTS: more test paths (space-separated) for the test step.
#
# No step stops the run: each one runs whatever the steps before it did, writes its results
# into OUT_DIR as it goes (so a run cut off by a time limit keeps all that came before the
# cut), prints its elapsed time and appends "<step> <exit code> <seconds>" to OUT_DIR/steps.txt.
# The script exits non-zero when any step failed.
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]}"
mode="${2:-}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0
: > "$out/steps.txt"

# step NAME LOG COMMAND...: runs COMMAND with its output shown and written to OUT_DIR/LOG.
step() {
    local name="$1" log="$2"
    shift 2
    local start=$SECONDS code
    echo "== $name"
    "$@" 2>&1 | tee "$out/$log"
    code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s"
    echo "$name $code $((SECONDS - start))" >> "$out/steps.txt"
    [ "$code" -eq 0 ] || status=1
}

versions() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$python" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$python" -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
}

if [ "$mode" = "--dry-run" ]; then
    tests=("tests/test_kernel_segment_attention.py::test_ragged_segments_match_the_oracle[local_w33-fp32]"
           tests/test_kernel_segment_attention.py::test_threshold_is_the_kth_largest_logit)
else
    tests=(tests -m gpu)
fi
# shellcheck disable=SC2206
tests+=(${GPU_CHECK_EXTRA_TESTS:-})

step versions versions.txt versions
step tests tests.log "$python" -m pytest -v -p no:cacheprovider --junitxml="$out/tests.xml" "${tests[@]}"
step benchmarks benchmarks.log "$python" benchmarks/gpu_kernels.py "$out" $mode
step topology topology.log "$python" benchmarks/gpu_topology.py "$out" $mode
exit $status
