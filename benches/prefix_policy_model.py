#!/usr/bin/env python3
"""A queueing model of the `prefix` policy on the Mooncake synthetic trace, for choosing its
defaults (cache weight w, release slack s) without an hour of simulated-engine runs per point.

Each of N engines is an FCFS prefill server with an LRU cache of 512-token trace blocks; prefill
time follows perf-model.md §2.4 roughly for Llama-3.1-8B on an H100 (8 ms + 28.5 µs per new token
+ attention). Load is what Tandem sees: uncached tokens queued plus 256 per in-flight request.
It prints the token hit rate, the request and token spread, releases, and the model's TTFT p50
and p90 (prefill only). Figures from it are a model's, not measurements; `tandem bench trace`
measures. Usage: benches/prefix_policy_model.py [trace] [rate-scale]
"""
import json
import sys
from collections import OrderedDict

TRACE = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mooncake_synthetic_trace.jsonl"
RATE = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
N = 8
reqs = [json.loads(line) for line in open(TRACE)]
reqs = [r for r in reqs if r["input_length"] <= 120_000]
reqs.sort(key=lambda r: r["timestamp"])


def prefill_secs(new, ctx):
    return (8 + 0.0285 * new + 8.3e-7 * new * ctx) / 1000.0


def pct(xs, p):
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))]


def run(cap_blocks, mode, w=1.0, c=256, r=1.5, s=16384):
    caches = [OrderedDict() for _ in range(N)]
    busy = [0.0] * N
    queues = [[] for _ in range(N)]
    hit = tot = releases = 0
    count, toks, ttft = [0] * N, [0] * N, []
    for i, rq in enumerate(reqs):
        t = rq["timestamp"] / 1000.0 / RATE
        hs, n = rq["hash_ids"], rq["input_length"]
        loads = []
        for e in range(N):
            queues[e] = [x for x in queues[e] if x[0] > t]
            loads.append(sum(x[1] for x in queues[e]) + c * len(queues[e]))
        hits = []
        for e in range(N):
            k = 0
            while k < len(hs) and hs[k] in caches[e]:
                k += 1
            hits.append(min(k * 512, n))
        least = min(range(N), key=lambda e: (loads[e], count[e]))
        if mode == "round-robin":
            pick = i % N
        elif mode == "longest-prefix":
            pick = max(range(N), key=lambda e: (hits[e], -count[e]))
        else:
            pick = min(range(N), key=lambda e: (loads[e] + w * (n - hits[e]), count[e]))
            if loads[pick] > r * loads[least] + s:
                pick, releases = least, releases + 1
        h = hits[pick]
        hit, tot = hit + h, tot + n
        count[pick] += 1
        toks[pick] += n
        start = max(t, busy[pick])
        fin = start + prefill_secs(n - h, (h + n) / 2)
        ttft.append(fin - t)
        busy[pick] = fin
        queues[pick].append((fin, n - h))
        cache = caches[pick]
        for x in hs:
            cache[x] = 1
            cache.move_to_end(x)
        while len(cache) > cap_blocks:
            cache.popitem(last=False)
    return (f"hit {100 * hit / tot:5.1f} %  req max/mean {max(count) * N / sum(count):.2f}  "
            f"tok max/mean {max(toks) * N / sum(toks):.2f}  releases {releases:4d}  "
            f"TTFT p50 {pct(ttft, .5):.2f} s  p90 {pct(ttft, .9):.2f} s")


for label, tokens in [("396k (H100 HBM)", 396_288), ("1.64M (HBM + 200 GiB host)", 1_638_400)]:
    cap = tokens // 512
    print(f"cache per engine {label}")
    print(f"  round-robin               {run(cap, 'round-robin')}")
    print(f"  longest-prefix (no load)  {run(cap, 'longest-prefix')}")
    for w, s in [(1, 16384), (1, 65536), (2, 16384), (2, 65536), (3, 65536)]:
        print(f"  prefix w={w} s={s:<6}        {run(cap, 'prefix', w=w, s=s)}")
