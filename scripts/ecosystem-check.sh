#!/usr/bin/env bash
# cunorm builds in one dependency graph with the cudarc settings of the GPU crates users pair
# it with (Cargo merges cudarc's features across the graph):
#   - candle-core's `cuda` feature: cudarc `dynamic-linking` (was a build-script panic beside
#     cunorm's `dynamic-loading`);
#   - burn's cubecl: cudarc `fallback-dynamic-loading` + `cuda-version-from-build-system`, with
#     cunorm's matching feature (the CUDA version from CUDARC_CUDA_VERSION, as a toolkit-less CI
#     sets it; with a toolkit, nvcc gives it).
# `cargo check` on a throwaway crate for each, in BUILD_DIR (default target/ecosystem).
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
