#!/usr/bin/env bash
# Runs the Mooncake Store side of `kvfabric-bench peers` inside a private
# network namespace that has only loopback: Mooncake's transfer engine binds
# 0.0.0.0 whatever it is told, so it must not see the machine's interfaces.
#
#   mooncake-netns.sh VENV LOGDIR PATHS SEGMENT_BYTES LEASE_MS -- BENCH_ARGS...
#
# VENV: the venv install-peers.sh made; LOGDIR: where the servers' logs go;
# PATHS: `colocated`, `remote` or `colocated,remote`; SEGMENT_BYTES: memory
# the store holding the data contributes; LEASE_MS: the master's object lease;
# BENCH_ARGS: passed to mooncake_bench.py (--sizes, --clients, --total-bytes,
# --batch). Inside the namespace it starts `mooncake_master` on 127.0.0.1,
# then for `colocated` runs mooncake_bench.py with the benchmark process
# holding the memory, and for `remote` starts a `mooncake_client` holding the
# memory and runs mooncake_bench.py as a pure client (no memory of its own).
# JSON lines go to stdout; everything the servers say goes to LOGDIR.
set -euo pipefail

if [[ "${1:-}" != "--inside" ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        exec unshare --net -- bash "$0" --inside "$@"
    else
        exec unshare --user --map-root-user --net -- bash "$0" --inside "$@"
    fi
fi
shift
[[ $# -ge 6 && "$6" == "--" ]] || {
    echo "usage: $0 VENV LOGDIR PATHS SEGMENT_BYTES LEASE_MS -- BENCH_ARGS..." >&2
    exit 2
}
VENV="$1" LOGDIR="$2" PATHS="$3" SEGMENT="$4" LEASE_MS="$5"
shift 6
HERE="$(cd "$(dirname "$0")" && pwd)"
MASTER_PORT=50051
CLIENT_PORT=50052

ip link set lo up
mkdir -p "$LOGDIR"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_port() {
    local port=$1 what=$2 pid=$3
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || {
            echo "$what exited at start: $(tail -n 1 "$LOGDIR/$what.log")" >&2
            return 1
        }
        sleep 0.05
    done
    echo "$what did not listen on 127.0.0.1:$port within 10 s" >&2
    return 1
}

"$VENV/bin/mooncake_master" --rpc_address=127.0.0.1 --rpc_port=$MASTER_PORT \
    --default_kv_lease_ttl="$LEASE_MS" --metrics_host=127.0.0.1 \
    --logtostderr >"$LOGDIR/mooncake_master.log" 2>&1 &
wait_port $MASTER_PORT mooncake_master $!

for path in ${PATHS//,/ }; do
    case "$path" in
    colocated)
        "$VENV/bin/python" "$HERE/mooncake_bench.py" --path colocated --master 127.0.0.1:$MASTER_PORT \
            --segment-bytes "$SEGMENT" --lease-ms "$LEASE_MS" "$@" 2>>"$LOGDIR/bench-colocated.log"
        ;;
    remote)
        "$VENV/bin/mooncake_client" --host=127.0.0.1 --port=$CLIENT_PORT --protocol=tcp \
            --metadata_server=P2PHANDSHAKE --master_server_address=127.0.0.1:$MASTER_PORT \
            --global_segment_size="$((SEGMENT >> 20))MB" --logtostderr >"$LOGDIR/mooncake_client.log" 2>&1 &
        wait_port $CLIENT_PORT mooncake_client $!
        "$VENV/bin/python" "$HERE/mooncake_bench.py" --path remote --master 127.0.0.1:$MASTER_PORT \
            --lease-ms "$LEASE_MS" "$@" 2>>"$LOGDIR/bench-remote.log"
        ;;
    *)
        echo "unknown path '$path'" >&2
        exit 2
        ;;
    esac
done
