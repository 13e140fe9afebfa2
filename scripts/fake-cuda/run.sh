#!/usr/bin/env bash
# Runs cunorm's whole CUDA path on the CPU through a fake CUDA driver (fakecuda.cpp: a
# libcuda.so.1 that executes the kernels' own source): the CUDA test suite with
# CUNORM_REQUIRE_CUDA=1, `cunorm demo --device cuda` (must print what the CPU demo prints),
# `cunorm check`, the bench's smoke run, the traffic build's counts of the first standard shapes
# (traffic.sh; rows forwards and evals must stay within 1.05x the minimum bytes), then the CUDA
# tests with the driver under AddressSanitizer (every kernel access bounds-checked; the same
# tests as a plain-driver run, which CI no longer makes as well: they compute the same bits,
# with the warm kernel cache). Fails if any kernel entry point was never launched.
# Not a GPU: proves the Rust side (discovery, CUBIN loading, argument packing, launch limits,
# copies) and kernel logic, not hardware behaviour or speed.
#
# usage: scripts/fake-cuda/run.sh [BUILD_DIR]
# needs: g++ >= 12 on x86-64 (with libasan), libnvrtc (CUNORM_NVRTC_DIR or the usual places).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=$(mkdir -p "${1:-$root/target/fake-cuda}" && cd "${1:-$root/target/fake-cuda}" && pwd)
cd "$root"

echo "-- building the fake driver (plain and AddressSanitizer)"
python3 "$here/../kernel-emu/prep.py" kernels "$build/kernels_emu.inc" "$build/kernels_registry.inc"
flags=(-std=c++20 -g -shared -fPIC -fvisibility=hidden -I "$build" -I "$here/../kernel-emu")
# A third build contracts a*b+c into fused multiply-adds as the GPU compiler does (when this
# CPU has FMA), so the tolerances are also checked against FMA arithmetic.
fma=()
grep -qw fma /proc/cpuinfo && fma=(-mfma -ffp-contract=fast)
mkdir -p "$build/plain" "$build/asan" "$build/fma"
g++ "${flags[@]}" -O2 "$here/fakecuda.cpp" -o "$build/plain/libcuda.so.1" &
g++ "${flags[@]}" -O1 -fsanitize=address -fno-omit-frame-pointer "$here/fakecuda.cpp" -o "$build/asan/libcuda.so.1" &
wait %1 && wait %2
g++ "${flags[@]}" -O2 "${fma[@]}" "$here/fakecuda.cpp" -o "$build/fma/libcuda.so.1"
for v in plain asan fma; do ln -sf libcuda.so.1 "$build/$v/libcuda.so"; done

cargo build --release --quiet
# The integration suite is one binary; its CUDA tests are the module `cuda::`.
test_bin=$(cargo test --release --test suite --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "suite" and m.get("executable"):
        print(m["executable"])')

export CUNORM_CACHE_DIR="$build/kernel-cache" CUNORM_REQUIRE_CUDA=1 FAKECUDA_COVERAGE="$build/coverage.txt"
rm -rf "$CUNORM_CACHE_DIR" "$FAKECUDA_COVERAGE"
plain() { LD_LIBRARY_PATH="$build/plain${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@"; }

echo "-- cunorm info"
plain target/release/cunorm info | tee "$build/info.txt"
grep -q "cunorm fake CUDA device" "$build/info.txt"

echo "-- cunorm demo --device cuda (cold kernel cache) == cunorm demo --device cpu"
plain target/release/cunorm demo --device cuda > "$build/demo-cuda.txt"
target/release/cunorm demo --device cpu > "$build/demo-cpu.txt"
diff <(tail -n +2 "$build/demo-cpu.txt") <(tail -n +2 "$build/demo-cuda.txt")
ls "$CUNORM_CACHE_DIR"/*.cubin > /dev/null

echo "-- CUDA sweep with an H100's 132 SMs (its launch configurations), threads and blocks in"
echo "   reverse order (a race changes results), ${fma[*]:-no FMA}"
FAKECUDA_ORDER=reverse FAKECUDA_SMS=132 LD_LIBRARY_PATH="$build/fma${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$test_bin" --test-threads 2 cuda::cuda_matches_cpu_everywhere

echo "-- cunorm check with 99 KiB of opt-in shared memory per block and no resident cluster (an"
echo "   sm_86/sm_89 GPU's limits; FAKECUDA_NO_CLUSTERS=1: the cluster kernels' fallback): rows of"
echo "   99 KiB to 227 KiB take the kernels for rows beyond shared memory"
FAKECUDA_SMEM_OPTIN=101376 FAKECUDA_NO_CLUSTERS=1 plain target/release/cunorm check --quick > "$build/check.txt"
tail -n 3 "$build/check.txt"

echo "-- cunorm check with the row paths forced (CUNORM_ROWS_PATH): block-per-row forwards,"
echo "   long-rows backwards, register-resident both ways, team kernels both ways, on every row"
echo "   length of the sweep; then the team forward with at most 2 and 8 packs a thread (and"
echo "   CUNORM_REQUIRE_CLUSTERS=1 with an H100's 132 SMs: every cluster kernel the shapes ask for"
echo "   must be resident; the default 4 SMs hold no cluster of 8 one-block-an-SM blocks)"
for p in block long reg team; do
  CUNORM_ROWS_PATH=$p plain target/release/cunorm check --quick > "$build/check-$p.txt"
  tail -n 1 "$build/check-$p.txt"
done
for k in 2 8; do
  FAKECUDA_SMS=132 CUNORM_REQUIRE_CLUSTERS=1 CUNORM_TEAM_KMAX=$k plain target/release/cunorm check --quick > "$build/check-team-kmax$k.txt"
  tail -n 1 "$build/check-team-kmax$k.txt"
done

echo "-- cunorm check with a block per plane in the contiguous BatchNorm reductions, the"
echo "   multi-launch channels-last GroupNorm/InstanceNorm and no cluster forward"
echo "   (CUNORM_PLANES_PER_BLOCK=1, CUNORM_PLANES_TILE=0, CUNORM_ROWS_CLUSTER=0: the layouts"
echo "   before several planes a block and the one-pass tiles; rows of more than 64 KiB through the"
echo "   block-per-row and wide forwards)"
CUNORM_PLANES_PER_BLOCK=1 CUNORM_PLANES_TILE=0 CUNORM_ROWS_CLUSTER=0 plain target/release/cunorm check --quick > "$build/check-plane-per-block.txt"
tail -n 1 "$build/check-plane-per-block.txt"

echo "-- cunorm bench smoke run (events, copy reference, L2 flush, JSON; timings meaningless)"
plain target/release/cunorm bench --quick --reps 1 --ops rms_norm --json > "$build/bench.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["results"]), "bench rows")' "$build/bench.json"

echo "-- traffic build: counted DRAM traffic of the first standard shape of each op (scaled"
echo "   along N), rows forward, every eval and GroupNorm [32, 512, 64, 64] (one pass, both"
echo "   layouts: forward, and f16/bf16 backward) at most 1.05x the minimum bytes"
"$here/traffic.sh" "$build" --quick --traffic-cap 1048576 --json-out "$build/traffic.json" > "$build/traffic.md"
python3 - "$build/traffic.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
assert rows and all(r["traffic"] and r["traffic"]["launches"] > 0 for r in rows), "no traffic counted"
# Every stage moves at least its minimum bytes: a lower ratio means the count missed accesses.
low = [(r["key"], round(r["traffic"]["ratio"], 3)) for r in rows if r["traffic"]["ratio"] < 0.999]
assert not low, f"counted below the minimum bytes: {low}"
# One pass where a slice fits on chip: rows forward; GroupNorm's groups (forward: the row
# kernel contiguous, planes_tile_fwd channels-last; backward: planes_tile_bwd[_contig], which
# hold x and dy of a 16-channel group in f16/bf16 only); eval reads x once anyway.
def one_pass(r):
    if r["stage"] == "eval":
        return True
    if r["op"] in ("layer_norm", "rms_norm"):
        return r["stage"] == "forward"
    if r["op"] != "group_norm" or r["shape"][1:] != [512, 64, 64]:
        return False
    return r["stage"] == "forward" or r["dtype"] != "f32"
gn = [r for r in rows if r["op"] == "group_norm" and r["shape"][1:] == [512, 64, 64]]
assert len(gn) == 12, f"expected GroupNorm [N, 512, 64, 64] in 3 dtypes x 2 layouts x 2 stages, got {len(gn)}"
bad = [(r["key"], round(r["traffic"]["ratio"], 3)) for r in rows
       if one_pass(r) and r["traffic"]["ratio"] > 1.05]
print(len(rows), "stages counted;", "over 1.05:", bad or "none")
sys.exit(1 if bad else 0)
PY

echo "-- CUDA test suite (warm kernel cache) under AddressSanitizer"
LD_LIBRARY_PATH="$build/asan${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  "$test_bin" --test-threads 2 cuda::

echo "-- kernel coverage"
want=$(grep -c emu_entry "$build/kernels_registry.inc")
got=$(awk '{print $1}' "$FAKECUDA_COVERAGE" | sort -u | wc -l)
echo "$got of $want kernel entry points launched"
[ "$got" -eq "$want" ]
echo "fake-cuda: all passed"
