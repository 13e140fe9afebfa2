#!/usr/bin/env bash
# cunorm builds in one dependency graph with the cudarc settings of the GPU crates users pair
# it with (Cargo merges cudarc's features across the graph):
#   - candle-core's `cuda` feature: cudarc `dynamic-linking` (was a build-script panic beside
#     cunorm's `dynamic-loading`);
#   - burn's cubecl: cudarc `fallback-dynamic-loading` + `cuda-version-from-build-system`, with
#     cunorm's matching feature (the CUDA version from CUDARC_CUDA_VERSION, as a toolkit-less CI
#     sets it; with a toolkit, nvcc gives it).
# `cargo check` on a throwaway crate for each, in BUILD_DIR (default target/ecosystem).
#
# With CUNORM_CHECK_CANDLE_CUDA=1 (as CI runs it) it also checks, beside candle-core with feature
# `cuda` itself:
#   - a crate that depends on cunorm with feature `candle-cuda` (`cargo check`);
#   - cunorm's own targets with `candle-cuda` (`cargo clippy -D warnings` of the library, the
#     tests — the candle-cuda test included — and the examples),
# so cunorm's candle ops on candle's CUDA storage type-check against candle's real CUDA backend.
# candle's build compiles its kernels with nvcc, so the CUDA 13.0 wheels (nvcc, runtime headers,
# CCCL, crt, nvvm: one release, as mixed releases fail) go into BUILD_DIR/cuda-venv, with
# CUDA_ROOT pointing at them and CUDA_COMPUTE_CAP=90 (no GPU to ask). Nothing here runs those
# kernels, so nvcc compiles them without optimization (NVCC_APPEND_FLAGS, cicc and ptxas at
# -O0): about 10 minutes on 2 cores instead of 19 (candle's quantized-matmul kernels at -O3).
# Set CUNORM_CANDLE_CUDA_OPT=1 to keep candle's own optimization (a build whose binaries will run
# on a GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/target/ecosystem}
mkdir -p "$build"
export CARGO_TARGET_DIR="$build/target"

check() { # name cunorm-features cudarc-features [env...]
  local name=$1 cunorm_features=$2 cudarc_features=$3
  shift 3
  mkdir -p "$build/$name/src"
  cat > "$build/$name/Cargo.toml" <<TOML
[package]
name = "$name"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
cunorm = { path = "$root", default-features = false, features = [$cunorm_features] }
cudarc = { version = "0.19", default-features = false, features = [$cudarc_features] }

[workspace]
TOML
  echo 'fn main() { let (dev, _why) = cunorm::Device::auto(); println!("{dev}"); }' > "$build/$name/src/main.rs"
  echo "-- $name"
  (cd "$build/$name" && env "$@" cargo check --quiet)
}

check candle-linking '"cuda-13"' '"std", "driver", "nvrtc", "dynamic-linking", "cuda-13000"' X=1
check cubecl-loading '"cuda-version-from-build-system"' \
  '"std", "driver", "nvrtc", "fallback-dynamic-loading", "cuda-version-from-build-system"' \
  CUDARC_CUDA_VERSION=13000
echo "ecosystem: cunorm builds beside candle's and cubecl's cudarc settings"

if [ "${CUNORM_CHECK_CANDLE_CUDA:-0}" = 1 ]; then
  venv="$build/cuda-venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvcc==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
  cuda=$(cd "$(dirname "$(find "$venv" -path '*nvidia/cu13/bin/nvcc' | head -n 1)")/.." && pwd)
  mkdir -p "$build/candle-cuda/src"
  # The repository's lock file (and, below, its profiles), so both builds resolve the same
  # versions and settings and share candle's kernel build in one target directory.
  cp "$root/Cargo.lock" "$build/candle-cuda/Cargo.lock"
  cat > "$build/candle-cuda/Cargo.toml" <<TOML
[package]
name = "candle-cuda"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
cunorm = { path = "$root", features = ["candle-cuda"] }
candle-core = { version = "0.11", features = ["cuda"] }

# The repository's profiles (see its Cargo.toml), so candle's kernels are built once for both.
[profile.dev.package."*"]
opt-level = 2

[profile.test]
opt-level = 3

[workspace]
TOML
  echo 'fn main() { let _ = candle_core::Device::new_cuda(0); let (dev, _why) = cunorm::Device::auto(); println!("{dev}"); }' \
    > "$build/candle-cuda/src/main.rs"
  nvcc_flags=""
  [ "${CUNORM_CANDLE_CUDA_OPT:-0}" = 1 ] || nvcc_flags="-Xcicc -O0 -Xptxas -O0"
  cuda_env=(CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_COMPUTE_CAP=90 PATH="$cuda/bin:$PATH"
    NVCC_APPEND_FLAGS="$nvcc_flags")
  echo "-- candle-cuda (candle-core cuda, CUDA wheels in $cuda)"
  (cd "$build/candle-cuda" && env "${cuda_env[@]}" cargo check --quiet)
  echo "-- cunorm's library, tests and examples with candle-cuda (clippy -D warnings)"
  (cd "$root" && env "${cuda_env[@]}" cargo clippy --quiet --features candle-cuda --lib --tests \
    --examples -- -D warnings)
  echo "ecosystem: cunorm's candle CUDA ops build beside candle-core's cuda feature"
fi
