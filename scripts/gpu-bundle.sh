#!/usr/bin/env bash
# Builds everything the GPU checks run (release, `--features cuda`) and puts it,
# with the shared libraries the binaries link that a CUDA machine may lack, in
# one folder (default `.gpurun/`, ignored by git) that can be copied to a GPU
# machine with no Rust toolchain. Then, on that machine, in the repository root:
#     bash scripts/gpu-checks.sh .gpurun OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${1:-.gpurun}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
export CARGO_INCREMENTAL=0
cargo build --release -p kvfabric-bench --features cuda --bin kvfabric-bench
# Test binaries: cargo prints their paths as JSON; keep the executables.
tests() {
    cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
rm -rf "$BUNDLE"; mkdir -p "$BUNDLE/lib" "$BUNDLE/lib-fallback"
cp "$CARGO_TARGET_DIR/release/kvfabric-bench" "$BUNDLE/"
cp "$(tests -p kvfabric-tiers --features cuda --lib)" "$BUNDLE/tiers-lib-cuda"
cp "$(tests -p kvfabric --features cuda --test local_cuda)" "$BUNDLE/fabric-local-cuda"
strip "$BUNDLE"/kvfabric-bench "$BUNDLE"/tiers-lib-cuda "$BUNDLE"/fabric-local-cuda
# Shared libraries outside glibc (rocksdb and its compressors, liburing, ...).
for b in "$BUNDLE"/kvfabric-bench "$BUNDLE"/tiers-lib-cuda "$BUNDLE"/fabric-local-cuda; do
    ldd "$b" | awk '/=> \// {print $3}'
done | sort -u | grep -Ev '/(libc|libm|libpthread|libdl|librt|libgcc_s|ld-linux[^/]*)\.so' |
    while read -r l; do
        # The C++ runtime and zlib are on every CUDA image, usually newer:
        # used only where the machine has none.
        case "$(basename "$l")" in
            libstdc++*|libz.so*) cp -L "$l" "$BUNDLE/lib-fallback/" ;;
            *) cp -L "$l" "$BUNDLE/lib/" ;;
        esac
    done
du -sh "$BUNDLE"; ls -la "$BUNDLE" "$BUNDLE/lib" "$BUNDLE/lib-fallback"
