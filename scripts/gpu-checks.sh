#!/usr/bin/env bash
# Runs the GPU checks from a bundle made by scripts/gpu-bundle.sh, on a machine
# with a CUDA GPU and driver (no Rust needed): the HBM tier's tests (conformance
# suite on real device memory), the local path's device tests
# (put_from_device / get_into_device, bytes verified) and the GPU benchmark
# (`kvfabric-bench gpu`: fabric vs raw pinned and pageable cuMemcpy). Output
# goes to stdout and to OUTDIR.
set -uo pipefail
BUNDLE="${1:-.gpurun}"; OUTDIR="${2:-gpu-results}"
mkdir -p "$OUTDIR"
lib="$PWD/$BUNDLE/lib"
for f in "$PWD/$BUNDLE"/lib-fallback/*; do
    [[ -e $f ]] && ! ldconfig -p | grep -q "$(basename "$f")" && cp "$f" "$lib/"
done
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
rc=0
ldd "$BUNDLE"/kvfabric-bench "$BUNDLE"/tiers-lib-cuda "$BUNDLE"/fabric-local-cuda | grep "not found" && rc=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv; uname -r; nproc; } 2>&1 | tee "$OUTDIR/machine.txt"
echo "== tiers: HBM tier tests (feature cuda)"
"$BUNDLE/tiers-lib-cuda" hbm --test-threads=1 --nocapture 2>&1 | tee "$OUTDIR/tiers-hbm.txt" || rc=1
echo "== fabric: local path <-> device"
"$BUNDLE/fabric-local-cuda" --test-threads=1 --nocapture 2>&1 | tee "$OUTDIR/fabric-local-cuda.txt" || rc=1
echo "== kvfabric-bench gpu"
"$BUNDLE/kvfabric-bench" gpu 2>&1 | tee "$OUTDIR/bench-gpu.txt" || rc=1
"$BUNDLE/kvfabric-bench" gpu --json --rounds 5 > "$OUTDIR/bench-gpu.jsonl" 2>&1 || rc=1
exit $rc
