#!/usr/bin/env bash
# Builds the release CLI and test binaries here (no GPU needed) and copies them, with
# scripts/gpu-run.sh, into one folder to carry to a GPU machine that has no Rust toolchain.
# usage: scripts/gpu-bundle.sh [DEST]   (default: gpu-bundle/, git-ignored)
# With GPU_BUNDLE_CANDLE_CUDA=1 it also bundles the test suite built with feature candle-cuda
# (tests/suite-candle-cuda.xz; gpu-run.sh's verify runs its candle_ops:: on candle's CUDA device).
# candle-core's cuda feature compiles candle's kernels with nvcc: this reuses the CUDA wheels that
# `CUNORM_CHECK_CANDLE_CUDA=1 CUNORM_CANDLE_CUDA_NVCC=real scripts/ecosystem-check.sh` installs
# into target/ecosystem, and its target directory (about 10 minutes on 2 cores after that check; candle's kernels at -O0).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-gpu-bundle}
rm -rf "$dest"
mkdir -p "$dest/tests"
cargo build --release --bins
cp target/release/cunorm "$dest/"
# Test binaries: ask cargo where it put them. Copies each test executable in cargo's JSON
# messages (stdin) to DEST/tests/<name><suffix $1>.
bundle_tests() {
  python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"] + sys.argv[2]
        shutil.copy(m["executable"], sys.argv[1] + "/tests/" + name)
        print("bundled test", name)
' "$dest" "${1:-}"
}
cargo test --release --no-run --message-format=json 2>/dev/null | bundle_tests
if [ "${GPU_BUNDLE_CANDLE_CUDA:-0}" = 1 ]; then
  nvcc=$(find target/ecosystem/cuda-venv -path '*nvidia/cu13/bin/nvcc' 2>/dev/null | head -n 1 || true)
  [ -n "$nvcc" ] || { echo "run CUNORM_CHECK_CANDLE_CUDA=1 CUNORM_CANDLE_CUDA_NVCC=real scripts/ecosystem-check.sh first" >&2; exit 1; }
  cuda=$(cd "$(dirname "$nvcc")/.." && pwd)
  # Beside candle, cudarc links its libraries (dynamic-linking), which the wheels do not carry:
  # link stubs with the real sonames and every function cudarc binds (the GPU machine's own
  # libraries are loaded at run time). candle's MoE kernels call the wheel's real libcudart.
  # The stubs go into the wheel's lib folder, which cudarc's build script searches: never put
  # that folder on LD_LIBRARY_PATH (their functions return nothing).
  cudarc=$(cargo metadata --format-version 1 | python3 -c 'import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  for l in cuda:driver:1 nvrtc:nvrtc:13 cublas:cublas:13 cublasLt:cublaslt:13 curand:curand:10; do
    IFS=: read -r lib module major <<< "$l"
    grep -oE '^\s+fn \w+\(' "$(dirname "$cudarc")/src/$module/sys/mod.rs" | sed -E 's/\s+fn (\w+)\(/void \1(void) {}/' |
      sort -u | gcc -shared -Wl,-soname,"lib$lib.so.$major" -o "$cuda/lib/lib$lib.so" -x c -
  done
  ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
  CARGO_TARGET_DIR=target/ecosystem/target CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_COMPUTE_CAP=90 \
    PATH="$cuda/bin:$PATH" NVCC_APPEND_FLAGS="-Xcicc -O0 -Xptxas -O0" \
    cargo test --features candle-cuda --test suite --no-run --message-format=json | bundle_tests -candle-cuda
  [ -x "$dest/tests/suite-candle-cuda" ] || { echo "the candle-cuda suite did not build" >&2; exit 1; }
  # 77 MB stripped (candle's kernels): packed to 4 MB, as the device tool carries 64 MiB.
  strip "$dest/tests/suite-candle-cuda" && xz -T2 "$dest/tests/suite-candle-cuda"
fi
cp scripts/gpu-run.sh benches/torch_compare.py "$dest/"
chmod +x "$dest/gpu-run.sh"
du -sh "$dest"
