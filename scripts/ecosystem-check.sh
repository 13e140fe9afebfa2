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
# candle's build (candle-kernels, through cudaforge) compiles its kernels with nvcc. Nothing
# here runs them and a check never reads them (the PTX is `include_str!`-ed, the static library
# only linked into binaries), so by default scripts/stub-nvcc/nvcc stands in for nvcc: it
# answers the version and architecture queries and writes every output empty. The Rust of
# candle-core's CUDA backend and of cunorm's candle-cuda ops type-checks exactly as against the
# real toolkit, in about a minute instead of 10 (CI's time on 2 cores with the real nvcc at
# -O0). With CUNORM_CANDLE_CUDA_NVCC=real the CUDA 13.0 wheels (nvcc, runtime headers, CCCL,
# crt, nvvm: one release, as mixed releases fail) go into BUILD_DIR/cuda-venv and compile the
# kernels for real, with CUDA_ROOT pointing at them and CUDA_COMPUTE_CAP=90 (no GPU to ask),
# without optimization (cicc and ptxas at -O0) unless CUNORM_CANDLE_CUDA_OPT=1 (a build whose
# binaries will run on a GPU; it implies the real nvcc).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/target/ecosystem}
mkdir -p "$build"
# Absolute: the checks run from their own folders (a relative BUILD_DIR, as CI passes, would
# point the stub toolkit's PATH and the target directory somewhere else there).
build=$(cd "$build" && pwd)
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
  nvcc_mode=${CUNORM_CANDLE_CUDA_NVCC:-stub}
  [ "${CUNORM_CANDLE_CUDA_OPT:-0}" = 1 ] && nvcc_mode=real
  if [ "$nvcc_mode" = real ]; then
    venv="$build/cuda-venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvcc==13.0.*" \
      "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
    cuda=$(cd "$(dirname "$(find "$venv" -path '*nvidia/cu13/bin/nvcc' | head -n 1)")/.." && pwd)
  else
    # A toolkit folder whose bin/nvcc is the stub (cudaforge takes the root from nvcc's path).
    cuda="$build/stub-cuda"
    mkdir -p "$cuda/bin" "$cuda/include" "$cuda/lib64"
    cp "$root/scripts/stub-nvcc/nvcc" "$cuda/bin/nvcc"
    # Its own target directory: candle-kernels' build script does not rerun when nvcc changes,
    # so empty kernels must never land where a real build (scripts/gpu-bundle.sh) looks.
    export CARGO_TARGET_DIR="$build/target-stub-nvcc"
  fi
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
  cuda_env=(CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda" NVCC="$cuda/bin/nvcc"
    CUDA_COMPUTE_CAP=90 PATH="$cuda/bin:$PATH" NVCC_APPEND_FLAGS="$nvcc_flags")
  echo "-- candle-cuda (candle-core cuda, nvcc: $nvcc_mode, in $cuda)"
  (cd "$build/candle-cuda" && env "${cuda_env[@]}" cargo check --quiet)
  echo "-- cunorm's library, tests and examples with candle-cuda (clippy -D warnings)"
  (cd "$root" && env "${cuda_env[@]}" cargo clippy --quiet --features candle-cuda --lib --tests \
    --examples -- -D warnings)
  echo "ecosystem: cunorm's candle CUDA ops build beside candle-core's cuda feature"
fi
