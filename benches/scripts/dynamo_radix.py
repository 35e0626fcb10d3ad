"""Dynamo's Python-exposed RadixTree (pip ai-dynamo-runtime) on the same
workload shape as `kvfabric-bench index` (see benches/src/index.rs):
chains of DEPTH blocks (shared prefix of DEPTH/2 from 1024 prefixes + a
unique suffix), stored in events of event_blocks blocks, each worker evicting its
oldest chain's suffix once over its share of BLOCKS pairs.

Run by `kvfabric-bench index --with-dynamo`; args: workers blocks event_blocks
depth events lookups seed. Prints one JSON object. Event encoding (JSON, Dynamo's
KvCacheEvent) happens before the clock starts; since the tree applies
events on a background thread, the timed phase ends with a synchronous
find_matches so every queued event is counted.
"""
import json
import random
import sys
import time
from collections import deque

import dynamo._core as core

PREFIXES = 1024


def main():
    workers, blocks, event_blocks, depth, n_events, n_lookups, seed = map(int, sys.argv[1:8])
    rng = random.Random(seed)
    rid = lambda: rng.getrandbits(63)  # noqa: E731
    prefixes = [[rid() for _ in range(depth // 2)] for _ in range(PREFIXES)]
    per_worker = max(blocks // workers, depth)
    held = [deque() for _ in range(workers)]
    held_n = [0] * workers
    eid = [0]

    def enc(data):
        eid[0] += 1
        return json.dumps({"event_id": eid[0], "data": data}).encode()

    def request(out):
        w = rng.randrange(workers)
        chain = prefixes[rng.randrange(PREFIXES)] + [rid() for _ in range(depth - depth // 2)]
        parent = None
        for i in range(0, len(chain), event_blocks):
            part = chain[i : i + event_blocks]
            blocks_ = [{"block_hash": h, "tokens_hash": h} for h in part]
            out.append((w, enc({"stored": {"parent_hash": parent, "blocks": blocks_}}), len(part)))
            parent = part[-1]
        held[w].append(chain)
        held_n[w] += len(chain)
        while held_n[w] > per_worker and held[w]:
            old = held[w].popleft()
            suffix = old[depth // 2 :]
            for i in range(0, len(suffix), event_blocks):
                part = suffix[i : i + event_blocks]
                out.append((w, enc({"removed": {"block_hashes": part}}), len(part)))
            held_n[w] -= len(old)

    tree = core.RadixTree()
    fill = []
    while sum(held_n) + depth * workers < blocks:
        request(fill)
    for w, b, _ in fill:
        try:
            tree.apply_event(w, b)
        except RuntimeError:
            pass
    tree.find_matches([0])

    timed = []
    while len(timed) < n_events:
        request(timed)
    start = time.perf_counter()
    nblocks = 0
    failed = 0
    for w, b, n in timed:
        try:
            tree.apply_event(w, b)
        except RuntimeError:
            # The tree refuses some events of this stream (a store whose
            # parent it dropped along with an evicted subtree); counted.
            failed += 1
        nblocks += n
    tree.find_matches([0])  # waits for the background thread to drain
    secs = time.perf_counter() - start

    chains = []
    while len(chains) < min(4096, n_lookups):
        q = held[rng.randrange(workers)]
        if q:
            chains.append(q[rng.randrange(len(q))])
    lat = []
    start = time.perf_counter()
    for i in range(n_lookups):
        c = chains[i % len(chains)]
        t = time.perf_counter_ns()
        tree.find_matches(c)
        lat.append(time.perf_counter_ns() - t)
    lsecs = time.perf_counter() - start
    lat.sort()
    print(
        json.dumps(
            {
                "resident_pairs": sum(held_n),
                "events_per_s": len(timed) / secs,
                "blocks_per_s": nblocks / secs,
                "lookup_p50_ns": lat[len(lat) // 2],
                "lookup_p99_ns": lat[min(len(lat) - 1, len(lat) * 99 // 100)],
                "lookups_per_s": n_lookups / lsecs,
                "failed_events": failed,
            }
        )
    )


if __name__ == "__main__":
    main()
