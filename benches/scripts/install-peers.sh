#!/usr/bin/env bash
# Installs the peer systems `kvfabric-bench peers` compares kvfabric with.
# Idempotent: a peer already installed is left as it is. Never run by CI
# (`kvfabric-bench --smoke` does not call it); `kvfabric-bench peers` calls it
# once per peer before starting that peer, and so can you:
#
#   benches/scripts/install-peers.sh redis      # redis-server (Debian package)
#   benches/scripts/install-peers.sh mooncake   # Mooncake Store, CPU build, in a venv
#
# User-space installs go under $KVFABRIC_PEERS_DIR (default
# ~/.cache/kvfabric/peers). On success the last line of stdout names what was
# installed (`redis-server /usr/bin/redis-server`,
# `mooncake /root/.cache/kvfabric/peers/mooncake-venv`); on failure the exit
# status is non-zero and the last line of stderr says why.
set -euo pipefail

PEERS_DIR="${KVFABRIC_PEERS_DIR:-$HOME/.cache/kvfabric/peers}"
# Mooncake's CPU-only wheel (transfer engine + store + mooncake_master /
# mooncake_client binaries). Pinned so the table can be re-measured.
MOONCAKE_PIP_SPEC="${MOONCAKE_PIP_SPEC:-mooncake-transfer-engine-non-cuda==0.3.13.post1}"

die() {
    echo "install-peers: $*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else through
# non-interactive sudo (fails instead of prompting).
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 || return 1
}

install_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "installing redis-server (apt-get)" >&2
        apt_install redis-server || die "apt-get install redis-server failed (not root and no sudo?)"
        # The package starts a system service where systemd runs; the
        # benchmark starts its own server on a free port, so stop that one.
        as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    local bin
    bin=$(command -v redis-server) || die "redis-server not on PATH after installing"
    "$bin" --version >&2 || die "$bin --version failed"
    echo "redis-server $bin"
}

install_mooncake() {
    local venv="$PEERS_DIR/mooncake-venv"
    local marker="$venv/.kvfabric-installed"
    if [[ -f "$marker" && "$(cat "$marker")" == "$MOONCAKE_PIP_SPEC" && -x "$venv/bin/mooncake_master" ]] &&
        "$venv/bin/python" -c "import mooncake.store" 2>/dev/null; then
        echo "mooncake $venv"
        return
    fi
    command -v unshare >/dev/null 2>&1 || apt_install util-linux || die "unshare (util-linux) missing"
    command -v ip >/dev/null 2>&1 || apt_install iproute2 || die "ip (iproute2) missing"
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 || apt_install python3 python3-venv || die "no python3"
    mkdir -p "$PEERS_DIR"
    if ! "$py" -m venv "$venv" >&2; then
        apt_install python3-venv || die "python3 -m venv failed and python3-venv could not be installed"
        "$py" -m venv "$venv" >&2 || die "python3 -m venv $venv failed"
    fi
    echo "installing $MOONCAKE_PIP_SPEC into $venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$MOONCAKE_PIP_SPEC" >&2 ||
        die "pip install $MOONCAKE_PIP_SPEC failed"
    [[ -x "$venv/bin/mooncake_master" ]] || die "the wheel installed no mooncake_master"
    [[ -x "$venv/bin/mooncake_client" ]] || die "the wheel installed no mooncake_client"
    "$venv/bin/python" -c "from mooncake.store import MooncakeDistributedStore" >&2 ||
        die "mooncake.store does not import"
    echo "$MOONCAKE_PIP_SPEC" >"$marker"
    echo "mooncake $venv"
}

[[ $# -ge 1 ]] || die "usage: $0 redis|mooncake..."
for peer in "$@"; do
    case "$peer" in
    redis) install_redis ;;
    mooncake) install_mooncake ;;
    *) die "unknown peer '$peer' (redis, mooncake)" ;;
    esac
done
