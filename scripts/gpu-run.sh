#!/usr/bin/env bash
# Runs on a GPU machine from a folder made by scripts/gpu-bundle.sh; builds nothing.
# usage: gpu-run.sh OUT [GROUP...]     GROUP: verify, perf, sanitize, profile
#                                      (default: verify perf)
#
# verify:   device info, NVRTC compile test, cold/warm start (`demo` with an empty, then a warm
#           kernel cache), the whole CUDA test suite with CUNORM_REQUIRE_CUDA=1, `cunorm check`
#           (and `check --quick` with each forced row path), `cunorm demo --device cuda`, the CPU
#           suites;
# perf:     benches/torch_compare.py (when PyTorch sees a GPU), then `cunorm bench --compare`
#           (table in bench.log, JSON in bench.json), then the LayerNorm/RMSNorm benchmark with
#           each forced row path (CUNORM_ROWS_PATH=block, =long, =reg: bench-rows-*.json), and
#           BatchNorm with a block per plane (CUNORM_PLANES_PER_BLOCK=1: bench-plane-per-block.json),
#           GroupNorm/InstanceNorm without the one-pass channels-last kernels (CUNORM_PLANES_TILE=0:
#           bench-plane-tile-off.json), the four row-kernel ops without the cluster kernels
#           (CUNORM_ROWS_CLUSTER=0, forward and backward: bench-rows-cluster-off.json);
# sanitize: compute-sanitizer memcheck, initcheck, synccheck, racecheck over the CUDA sweep
#           (CUNORM_CHECK_QUICK=1);
# profile:  ncu (SpeedOfLight, MemoryWorkloadAnalysis, Occupancy) over the first launch of every
#           kernel in `cunorm bench --reps 1` (the first standard shape of each op).
#
# One call of the device tool covers everything (331.6 s on an H100, 2026-11-27, before the
# forced-path checks and the reg bench, about 30 s more, were added):
#   GPU_RUN_SKIP="cpu-tests" GPU_RUN_DEADLINE=470 gpu-bundle/gpu-run.sh "$OUT" verify perf sanitize profile
#
# Every step has its own time limit and the run a deadline (GPU_RUN_DEADLINE seconds, default
# 560, under the device tool's 600 s per call): a step that would start past it is skipped and
# says so, so one slow step cannot take the rest down; rerun the missing group in another call.
# Logs are written to a work folder, then packed into ONE file, OUT/gpu-run-<groups>.tar.gz
# (the device tool returns at most 8 files), with OUT/summary-<groups>.txt (one line per step:
# rc, time) beside it. The kernel cache stays outside OUT.
# GPU_RUN_SKIP names steps not to run (e.g. "cpu-tests", which CI runs anyway) when device time
# is short. GPU_RUN_BENCH_ARGS adds arguments to `cunorm bench` (e.g. "--quick --reps 1" for a smoke run
# of this script on scripts/fake-cuda's driver).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:?usage: gpu-run.sh OUT [verify|perf|sanitize|profile]...}
shift
groups=${*:-verify perf}
tag=$(echo "$groups" | tr ' ' '-')
mkdir -p "$dest"
out=$(mktemp -d "${TMPDIR:-/tmp}/cunorm-gpu-run.XXXXXX")
export CUNORM_REQUIRE_CUDA=1 CUNORM_REQUIRE_NVRTC=1
export CUNORM_CACHE_DIR=${CUNORM_CACHE_DIR:-${TMPDIR:-/tmp}/cunorm-kernel-cache}
[ -d /usr/local/cuda/lib64 ] && export CUNORM_NVRTC_DIR=${CUNORM_NVRTC_DIR:-/usr/local/cuda/lib64}
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"  # compute-sanitizer
# Pack whatever is there on any exit (a step killed by the deadline included).
pack() {
  [ -d "$out" ] || return
  cp "$out/summary.txt" "$dest/summary-$tag.txt" 2>/dev/null
  tar czf "$dest/gpu-run-$tag.tar.gz" -C "$out" . && rm -rf "$out"
}
trap pack EXIT
read -r -a bench_args <<< "${GPU_RUN_BENCH_ARGS:-}"
deadline=$(( $(date +%s) + ${GPU_RUN_DEADLINE:-560} ))
status=0

run() { # limit_seconds name command...
  local limit=$1 name=$2; shift 2
  if [[ " ${GPU_RUN_SKIP:-} " == *" $name "* ]]; then
    printf '%-28s skipped: GPU_RUN_SKIP\n' "$name" | tee -a "$out/summary.txt"
    return
  fi
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 5 ]; then
    printf '%-28s skipped: deadline reached\n' "$name" | tee -a "$out/summary.txt"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 t1 rc
  t0=$(date +%s%N)
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  local note=""
  [ $rc -eq 124 ] && note="  (timed out after ${limit} s)"
  printf '%-28s rc=%-3s %8d ms%s\n' "$name" "$rc" $(( (t1 - t0) / 1000000 )) "$note" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}
has() { [[ " $groups " == *" $1 "* ]]; }

{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/device.txt" 2>&1

if has verify; then
  run 20 info "$here/cunorm" info
  # 64 s on the H100 machine of 2026-11-27 (two tests; the compile of every module for sm_80
  # and sm_90 is one of them): 60 s cut it there.
  run 150 nvrtc-compile "$here/tests/suite" --test-threads=2 nvrtc_compile::
  # Cold start: first run with an empty kernel cache, then warm.
  rm -rf "$CUNORM_CACHE_DIR"
  run 60 demo-cold "$here/cunorm" demo --device cuda --steps 10 --json
  # What the cold start compiled (the CUBINs' times against the step's), since a cold start under
  # a second has been seen where NVRTC takes seconds.
  run 10 demo-cold-cache ls -la --time-style=full-iso "$CUNORM_CACHE_DIR"
  run 30 demo-warm "$here/cunorm" demo --device cuda --steps 10 --json
  run 120 cuda-tests "$here/tests/suite" --test-threads=1 --nocapture cuda::
  # CUNORM_REQUIRE_CLUSTERS=1: a cluster kernel that cannot be resident is an error, not a
  # silent fallback (so this check proves the cluster kernels ran on an sm_90 GPU).
  run 60 check env CUNORM_REQUIRE_CLUSTERS=1 "$here/cunorm" check
  # The row paths the shape does not pick (src/ops/rows/cuda.rs RowsPath), checked on the GPU
  # too: every row length of the sweep through each.
  for p in block long reg team; do
    run 60 "check-rows-$p" env CUNORM_ROWS_PATH=$p "$here/cunorm" check --quick
  done
  # The team forward with fewer packs per thread (CUNORM_TEAM_KMAX), as the perf group times it.
  for k in 4 2; do
    run 60 "check-team-k$k" env CUNORM_TEAM_KMAX=$k "$here/cunorm" check --quick
  done
  # A block per plane in the contiguous BatchNorm reductions (the layout before several planes a
  # block), the multi-launch channels-last GroupNorm/InstanceNorm forward and backward, and rows
  # of more than 64 KiB without the cluster forward, as the perf group times them.
  run 60 check-plane-per-block env CUNORM_PLANES_PER_BLOCK=1 CUNORM_PLANES_TILE=0 CUNORM_ROWS_CLUSTER=0 \
    "$here/cunorm" check --quick
  run 30 demo-cuda "$here/cunorm" demo --device cuda
  run 30 demo-cuda-json "$here/cunorm" demo --device cuda --json
  # The suite built with feature candle-cuda (GPU_BUNDLE_CANDLE_CUDA=1): cunorm's ops on candle's
  # CUDA device against its CPU device. candle links libcublas/libcurand: the toolkit's, else
  # the ones PyTorch's wheels carry. (Its other tests read the source tree: CI runs them.)
  if [ -f "$here/tests/suite-candle-cuda.xz" ]; then
    candle_suite=${TMPDIR:-/tmp}/cunorm-suite-candle-cuda
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$here/tests/suite-candle-cuda.xz" "$candle_suite" && chmod +x "$candle_suite"
    libs=$(find /usr/local/cuda/lib64 $(python3 -c 'import site; print(*site.getsitepackages())' 2>/dev/null) \
      \( -name 'libcublas.so.*' -o -name 'libcurand.so.*' -o -name 'libcudart.so.*' -o -name 'libnvrtc.so.*' \) \
      -printf '%h\n' 2>/dev/null | awk '!seen[$0]++' | tr '\n' ':')
    run 120 candle-cuda env LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}" \
      "$candle_suite" --test-threads=1 --nocapture candle_ops::cuda_matches_cpu
  fi
  # golden:: and architecture:: read the source tree, which the bundle does not carry.
  run 120 cpu-tests "$here/tests/suite" --skip cuda:: --skip nvrtc_compile:: --skip golden:: --skip architecture::
fi

if has perf; then
  compare=()
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && [ -f "$here/torch_compare.py" ]; then
    run 150 torch-bench python3 "$here/torch_compare.py" "$out/torch.json"
    [ -s "$out/torch.json" ] && compare=(--compare "$out/torch.json")
  else
    echo "PyTorch with CUDA not found: bench without the PyTorch column" | tee -a "$out/summary.txt"
  fi
  run 180 bench "$here/cunorm" bench "${bench_args[@]}" "${compare[@]}" --json-out "$out/bench.json"
  # The row paths the shape does not pick, timed on the same machine (src/ops/rows/cuda.rs
  # RowsPath): block-per-row forwards, long-rows backwards, register-resident both ways, the
  # team kernels both ways (every dtype).
  for p in block long reg team; do
    run 60 "bench-rows-$p" env CUNORM_ROWS_PATH=$p "$here/cunorm" bench --ops layer_norm,rms_norm \
      "${bench_args[@]}" --json-out "$out/bench-rows-$p.json"
  done
  for k in 4 2; do
    run 60 "bench-team-k$k" env CUNORM_TEAM_KMAX=$k "$here/cunorm" bench --ops layer_norm,rms_norm \
      "${bench_args[@]}" --json-out "$out/bench-team-k$k.json"
  done
  run 60 bench-plane-per-block env CUNORM_PLANES_PER_BLOCK=1 "$here/cunorm" bench --ops batch_norm \
    "${bench_args[@]}" --json-out "$out/bench-plane-per-block.json"
  run 45 bench-plane-tile-off env CUNORM_PLANES_TILE=0 "$here/cunorm" bench \
    --ops group_norm,instance_norm "${bench_args[@]}" --json-out "$out/bench-plane-tile-off.json"
  # Rows (and contiguous groups) of more than 64 KiB through the block-per-row and wide forwards,
  # against the cluster forward in bench.json.
  run 60 bench-rows-cluster-off env CUNORM_ROWS_CLUSTER=0 "$here/cunorm" bench \
    --ops layer_norm,rms_norm,group_norm,instance_norm "${bench_args[@]}" \
    --json-out "$out/bench-rows-cluster-off.json"
fi

if has sanitize; then
  if command -v compute-sanitizer > /dev/null; then
    # Most telling first; each capped so that one slow tool leaves time for the next.
    for t in memcheck racecheck synccheck initcheck; do
      CUNORM_CHECK_QUICK=1 run 75 "sanitizer-$t" compute-sanitizer --tool "$t" --error-exitcode 1 \
        "$here/tests/suite" --test-threads=1 cuda::cuda_matches_cpu_everywhere
    done
    # The team kernels of every dtype, both ways (the default takes them for aligned rows of
    # whole packs only).
    for t in memcheck racecheck; do
      CUNORM_ROWS_PATH=team CUNORM_CHECK_QUICK=1 run 75 "sanitizer-team-$t" compute-sanitizer \
        --tool "$t" --error-exitcode 1 "$here/tests/suite" --test-threads=1 cuda::cuda_matches_cpu_everywhere
    done
  else
    echo "compute-sanitizer not found on PATH: sanitizer steps not run" | tee -a "$out/summary.txt"
    status=1
  fi
fi

if has profile; then
  if command -v ncu > /dev/null; then
    # The first launch of every kernel (--kernel-id :::1), clocks left alone as the benches run
    # them; an ncu that does not take that filter falls back to the first 60 launches.
    sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy)
    run 240 ncu bash -c '"$@" --kernel-id :::1 --csv --page details "$0" bench --reps 1 ${GPU_RUN_BENCH_ARGS:-} ||
      "$@" --launch-count 60 --csv --page details "$0" bench --reps 1 ${GPU_RUN_BENCH_ARGS:-}' \
      "$here/cunorm" ncu --clock-control none "${sections[@]}"
  else
    echo "ncu not found on PATH: profile step not run" | tee -a "$out/summary.txt"
    status=1
  fi
fi

echo "overall status: $status" | tee -a "$out/summary.txt"
exit $status  # the EXIT trap packs the logs
