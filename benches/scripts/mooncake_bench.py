#!/usr/bin/env python3
"""Mooncake Store side of `kvfabric-bench peers`.

Runs the peers matrix (value sizes x client counts; put then get, distinct
keys, contents verified) against a running `mooncake_master`, from N client
threads sharing one `MooncakeDistributedStore`, and prints one JSON object per
line in the schema `kvfabric-bench peers --json` uses:

    {"system": "mooncake", "path": "remote"|"colocated", "op": "put"|"get",
     "value_bytes": ..., "clients": ..., "gbps": ..., "p50_us": ..., "p99_us": ...}

A cell that fails prints the same keys with `"unavailable": "<reason>"` and the
numbers null, and the next cell still runs.

`--path colocated`: this process contributes `--segment-bytes` of memory to
the pool, so values land in memory it holds. `--path remote`: it contributes
none (global_segment_size 0); a separate `mooncake_client` (started by
mooncake-netns.sh) holds the memory and every value crosses loopback TCP.

To keep the Python driver's own overhead out of the numbers as far as the API
allows: every buffer is allocated, filled and registered with
`register_buffer` before the clock starts; transfers use the zero-copy batch
calls `batch_put_from` / `batch_get_into` on those registered buffers, `--batch`
values per call; each client is a thread (the batch calls release the GIL while they
transfer: co-located throughput grows with threads); verification is a libc `memcmp`
after the timed region. Per-op latency is the latency of the call that
carried the op (all values of a batch complete when the call returns), the
same rule the Rust side uses.

Only the Python standard library and the `mooncake` wheel are needed.
"""

import argparse
import ctypes
import json
import mmap
import os
import sys
import threading
import time

LIBC = ctypes.CDLL(None)
LIBC.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
LIBC.memcmp.restype = ctypes.c_int
LIBC.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
LIBC.memset.restype = ctypes.c_void_p
LIBC.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
LIBC.memcpy.restype = ctypes.c_void_p

# When the previous cell's objects can be removed (their read leases over).
CLEANUP = {"after": 0.0}

# Distinct random bytes that values are cut from (each value also carries its
# own key stamp, so no two values are equal).
POOL_BYTES = 16 << 20


class Buffer:
    """An anonymous mapping (page aligned) with its address."""

    def __init__(self, length):
        self.length = length
        self.map = mmap.mmap(-1, max(length, 1))
        self._view = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(self._view)

    def close(self):
        del self._view
        self.map.close()


def percentile(sorted_ns, q):
    """Nearest-rank percentile of a sorted list, in microseconds."""
    if not sorted_ns:
        return None
    rank = max(1, -(-len(sorted_ns) * q // 1))  # ceil(n * q), at least 1
    return sorted_ns[min(len(sorted_ns), int(rank)) - 1] / 1e3


def emit(row):
    print(json.dumps(row), flush=True)


def run_phase(clients, work):
    """Runs `work(client) -> (latencies_ns, end_ns, error)` on one thread per
    client, all released at once; returns (elapsed_ns, latencies, errors)."""
    barrier = threading.Barrier(clients + 1)
    results = [None] * clients

    def body(c):
        try:
            barrier.wait()
            results[c] = work(c)
        except Exception as e:  # reported, never hangs the others
            results[c] = ([], time.perf_counter_ns(), f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=body, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter_ns()
    for t in threads:
        t.join()
    end = max(r[1] for r in results)
    lat = sorted(x for r in results for x in r[0])
    errors = [r[2] for r in results if r[2]]
    return end - start, lat, errors


def cell(store, args, cell_id, size, clients, pool, pool_addr, report=True):
    per_client = args.per_client or max(1, args.total_bytes // (size * clients))
    batch = max(1, args.batch)
    base = {"system": "mooncake", "path": args.path, "value_bytes": size, "clients": clients}
    bufs = []
    registered = []
    try:
        # Preallocate, fill and register every buffer before timing.
        puts, gets, keys = [], [], []
        for c in range(clients):
            p, g = Buffer(per_client * size), Buffer(per_client * size)
            bufs += [p, g]
            for k in range(per_client):
                dst = p.addr + k * size
                off = ((c * per_client + k) * 4096 + cell_id * 64) % (POOL_BYTES - size + 1)
                LIBC.memcpy(dst, pool_addr + off, size)
                stamp = f"{cell_id}/{c}/{k}".encode()[: min(size, 32)]
                ctypes.memmove(dst, stamp, len(stamp))
            LIBC.memset(g.addr, 0, per_client * size)  # fault the pages in now
            for b in (p, g):
                rc = store.register_buffer(b.addr, b.length)
                if rc != 0:
                    raise RuntimeError(f"register_buffer returned {rc}")
                registered.append(b)
            puts.append(p)
            gets.append(g)
            keys.append([f"kvfb-{cell_id}-{c}-{k}" for k in range(per_client)])

        def worker(bufs_of, call, want):
            def work(c):
                lat = []
                ks = keys[c]
                base_addr = bufs_of[c].addr
                for i in range(0, per_client, batch):
                    n = min(batch, per_client - i)
                    ptrs = [base_addr + (i + j) * size for j in range(n)]
                    t0 = time.perf_counter_ns()
                    rcs = call(ks[i : i + n], ptrs, [size] * n)
                    t1 = time.perf_counter_ns()
                    bad = [r for r in rcs if r != want]
                    if bad or len(rcs) != n:
                        return lat, t1, f"{call.__name__} returned {bad[:3] or rcs}"
                    lat += [t1 - t0] * n
                return lat, time.perf_counter_ns(), None

            return work

        # Free the previous cell's objects (untimed), once their leases end.
        wait = CLEANUP["after"] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        store.remove_all()
        results = {}
        for op, bufs_of, call, want in (
            ("put", puts, store.batch_put_from, 0),
            ("get", gets, store.batch_get_into, size),
        ):
            elapsed, lat, errors = run_phase(clients, worker(bufs_of, call, want))
            if errors:
                raise RuntimeError(f"{op}: {errors[0]}")
            results[op] = (elapsed, lat)
        # Verify byte for byte, outside the timed region.
        for c in range(clients):
            if LIBC.memcmp(puts[c].addr, gets[c].addr, per_client * size) != 0:
                raise RuntimeError(f"client {c}: values read back differ from those written")
        total = per_client * size * clients
        for op in ("put", "get") if report else ():
            elapsed, lat = results[op]
            emit(
                dict(
                    base,
                    op=op,
                    gbps=total / max(elapsed, 1),  # bytes per ns = GB/s
                    p50_us=percentile(lat, 0.50),
                    p99_us=percentile(lat, 0.99),
                    ops=len(lat),
                    seconds=elapsed / 1e9,
                )
            )
    except Exception as e:
        for op in ("put", "get") if report else ():
            emit(dict(base, op=op, gbps=None, p50_us=None, p99_us=None, unavailable=str(e)))
    finally:
        # Objects stay leased for the master's --default_kv_lease_ttl after
        # a get; the next cell removes them once that has passed.
        CLEANUP["after"] = time.monotonic() + args.lease_ms / 1e3 + 0.1
        for b in registered:
            store.unregister_buffer(b.addr)
        for b in bufs:
            b.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", choices=["remote", "colocated"], required=True)
    ap.add_argument("--master", required=True, help="host:port of mooncake_master")
    ap.add_argument("--sizes", required=True, help="value sizes in bytes, comma separated")
    ap.add_argument("--clients", required=True, help="client counts, comma separated")
    ap.add_argument("--total-bytes", type=int, required=True, help="bytes put (and got) per cell")
    ap.add_argument("--per-client", type=int, default=0, help="values per client (overrides --total-bytes)")
    ap.add_argument("--batch", type=int, default=4, help="values per batch call")
    ap.add_argument("--segment-bytes", type=int, default=0, help="memory this process contributes")
    ap.add_argument("--local-buffer-bytes", type=int, default=64 << 20)
    ap.add_argument("--lease-ms", type=int, default=2000, help="the master's --default_kv_lease_ttl")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    clients = [int(c) for c in args.clients.split(",") if c]

    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        for s in sizes:
            for c in clients:
                for op in ("put", "get"):
                    emit(
                        {"system": "mooncake", "path": args.path, "op": op, "value_bytes": s, "clients": c,
                         "gbps": None, "p50_us": None, "p99_us": None, "unavailable": f"import: {e}"}
                    )
        return 0

    segment = args.segment_bytes if args.path == "colocated" else 0
    store = MooncakeDistributedStore()
    rc = store.setup(
        "127.0.0.1", "P2PHANDSHAKE", segment, args.local_buffer_bytes, "tcp", "", args.master
    )
    if rc != 0:
        for s in sizes:
            for c in clients:
                for op in ("put", "get"):
                    emit(
                        {"system": "mooncake", "path": args.path, "op": op, "value_bytes": s, "clients": c,
                         "gbps": None, "p50_us": None, "p99_us": None, "unavailable": f"setup returned {rc}"}
                    )
        return 0
    pool = Buffer(POOL_BYTES)
    ctypes.memmove(pool.addr, os.urandom(POOL_BYTES), POOL_BYTES)
    # Warm-up, not reported: fault in the segment's pages (and the transfer
    # engine's connections) the way a long-running store would have them.
    cell(store, args, 0, max(sizes), 1, pool, pool.addr, report=False)
    cell_id = 1
    for s in sizes:
        for c in clients:
            t = time.monotonic()
            cell(store, args, cell_id, s, c, pool, pool.addr)
            print(f"# mooncake {args.path} {s} B x{c}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
            cell_id += 1
    pool.close()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
