#!/usr/bin/env bash
# Starts a local S3-protocol server (SeaweedFS `weed mini`) on loopback for
# trying the object tier by hand; the tests start their own. Signatures are
# enforced with the credentials below. Ctrl+C stops it.
#
#   scripts/s3-server.sh [DATA_DIR]        (default: ./kvfabric-data/s3)
#
# Environment: S3_PORT (8333), S3_BUCKET (kvfabric), AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (kvfabric / kvfabric-secret), KVFABRIC_TEST_S3_BIN
# (the `weed` binary; default: where scripts/install-test-deps.sh puts it).
set -euo pipefail

DATA_DIR="$(realpath -m "${1:-kvfabric-data/s3}")"
S3_PORT="${S3_PORT:-8333}"
S3_BUCKET="${S3_BUCKET:-kvfabric}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-kvfabric}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-kvfabric-secret}"
DEPS_DIR="${KVFABRIC_TEST_DEPS_DIR:-$HOME/.cache/kvfabric/test-deps}"
WEED="${KVFABRIC_TEST_S3_BIN:-$(command -v weed || echo "$DEPS_DIR/seaweedfs-venv/bin/weed")}"
if [[ ! -x "$WEED" ]]; then
    echo "SeaweedFS not found at $WEED: run scripts/install-test-deps.sh" >&2
    exit 1
fi

mkdir -p "$DATA_DIR/tmp"
cat <<MSG
S3 endpoint http://127.0.0.1:$S3_PORT, bucket $S3_BUCKET. Object tier settings:
  url = "s3://$S3_BUCKET/kv"   endpoint = "http://127.0.0.1:$S3_PORT"
  AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
MSG
# Ports: S3 as asked; SeaweedFS's internal services keep their defaults, on
# loopback only (-ip and -ip.bind, always both).
TMPDIR="$DATA_DIR/tmp" exec "$WEED" mini -dir="$DATA_DIR" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$S3_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
    -webdav=false -admin.ui=false -master.telemetry=false \
    -filer.localSocket="$DATA_DIR/filer.sock" -s3.localSocket="$DATA_DIR/s3.sock" \
    -bucket="$S3_BUCKET"
