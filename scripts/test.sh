#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then
# builds and runs every test, checks the optional features compile, and runs
# the benchmark driver's smoke mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

bash scripts/install-test-deps.sh

echo "== feature builds compile (cuda, benches)"
cargo check --workspace --all-targets --features kvfabric/cuda,kvfabric-tiers/cuda
echo "== tests"
cargo test --workspace --no-fail-fast
echo "== benchmark driver smoke run"
cargo run -q -p kvfabric-bench -- --smoke
