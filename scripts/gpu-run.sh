#!/usr/bin/env bash
# Runs on a GPU machine from a folder made by scripts/gpu-bundle.sh; builds nothing.
# usage: gpu-run.sh LOG_DIR
# Writes every log to LOG_DIR: device info, the whole CUDA test suite with CUNORM_REQUIRE_CUDA=1,
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over the CUDA tests,
# `cunorm check` and `cunorm demo --device cuda`.
# GPU_RUN_BENCH_ARGS adds arguments to every `cunorm bench` (e.g. "--quick --reps 1" for a smoke
# run of this script on scripts/fake-cuda's driver).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: gpu-run.sh LOG_DIR}
mkdir -p "$out"
export CUNORM_REQUIRE_CUDA=1 CUNORM_REQUIRE_NVRTC=1
export CUNORM_CACHE_DIR=${CUNORM_CACHE_DIR:-$out/kernel-cache}
[ -d /usr/local/cuda/lib64 ] && export CUNORM_NVRTC_DIR=${CUNORM_NVRTC_DIR:-/usr/local/cuda/lib64}
status=0
bench_args=(${GPU_RUN_BENCH_ARGS:-})
run() { # name, command...
  local name=$1; shift
  local t0 t1 rc
  t0=$(date +%s%N)
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  printf '%-28s rc=%-3s %8d ms\n' "$name" "$rc" $(( (t1 - t0) / 1000000 )) | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/device.txt" 2>&1
run info "$here/cunorm" info
run nvrtc-compile "$here/tests/nvrtc_compile" --test-threads=1
# Cold start: first run with an empty kernel cache, then warm.
rm -rf "$CUNORM_CACHE_DIR"
run demo-cold "$here/cunorm" demo --device cuda --steps 10 --json
run demo-warm "$here/cunorm" demo --device cuda --steps 10 --json
run cuda-tests "$here/tests/cuda" --test-threads=1 --nocapture
run check "$here/cunorm" check
for t in memcheck racecheck initcheck synccheck; do
  CUNORM_CHECK_QUICK=1 run "sanitizer-$t" compute-sanitizer --tool "$t" --error-exitcode 1 \
    "$here/tests/cuda" --test-threads=1 cuda_matches_cpu_everywhere
done
# Performance: PyTorch's side first (if this machine has it), then cunorm with the comparison.
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && [ -f "$here/torch_compare.py" ]; then
  run torch-bench python3 "$here/torch_compare.py" "$out/torch.json"
  run bench "$here/cunorm" bench "${bench_args[@]}" --compare "$out/torch.json"
  run bench-json "$here/cunorm" bench "${bench_args[@]}" --json --compare "$out/torch.json"
else
  run bench "$here/cunorm" bench "${bench_args[@]}"
fi
run demo-cuda "$here/cunorm" demo --device cuda
run demo-cuda-json "$here/cunorm" demo --device cuda --json
# CPU suites too (golden data paths are compiled in; they skip nothing on the GPU machine).
for t in cpu_paths errors seed; do
  [ -x "$here/tests/$t" ] && run "cpu-$t" "$here/tests/$t"
done
echo "overall status: $status" | tee -a "$out/summary.txt"
exit $status
