#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then
# builds and runs every test, checks the optional features compile, and runs
# the benchmark driver's smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# No incremental caches: CI builds once from a clean clone, and they cost gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

bash scripts/install-test-deps.sh

echo "== the client library builds without server code"
cargo check -p kvfabric --no-default-features
# The router without the tokenizers feature (byte-level text only).
cargo check -p kvfabric-router --no-default-features
echo "== the cuda feature compiles (HBM tier, device link, kvfabric-bench gpu)"
cargo check -p kvfabric-tiers -p kvfabric -p kvfabric-bench --features kvfabric-bench/cuda
echo "== the rdma feature compiles, and its device-free unit tests pass (descriptors, region bookkeeping)"
cargo check -p kvfabric --features rdma
cargo test -p kvfabric --features rdma --lib transport
echo "== clippy, every target (benches included), warnings are errors"
cargo clippy --workspace --all-targets -- -D warnings
echo "== formatting"
cargo fmt --all -- --check
echo "== tests"
cargo test --workspace --no-fail-fast
echo "== benchmark driver smoke run"
cargo run -q -p kvfabric-bench -- --smoke
