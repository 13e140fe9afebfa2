#!/usr/bin/env bash
# Builds the release CLI and test binaries here (no GPU needed) and copies them, with
# scripts/gpu-run.sh, into one folder to carry to a GPU machine that has no Rust toolchain.
# usage: scripts/gpu-bundle.sh [DEST]   (default: gpu-bundle/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-gpu-bundle}
rm -rf "$dest"
mkdir -p "$dest/tests"
cargo build --release --bins
cp target/release/cunorm "$dest/"
# Test binaries: ask cargo where it put them.
cargo test --release --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/tests/" + m["target"]["name"])
        print("bundled test", m["target"]["name"])
' "$dest"
cp scripts/gpu-run.sh benches/torch_compare.py "$dest/"
chmod +x "$dest/gpu-run.sh"
du -sh "$dest"
