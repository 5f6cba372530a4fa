#!/usr/bin/env python3
"""Read-pattern timers for the macro benchmarks (stdlib only).

  reads.py seq FILE                 -> {"bytes": N, "seconds": S, "mb_per_s": X}   (1 MiB reads)
  reads.py random ROOT LIST N SEED  -> {"reads": N, "p50_ms": .., "p99_ms": .., "mean_ms": ..}
      N reads of 4 KiB at a random offset of a random file named in LIST (paths relative to
      ROOT, one per line); each read's time includes open().
"""
import json, os, random, sys, time

def seq(path):
    fd = os.open(path, os.O_RDONLY)
    total, t0 = 0, time.perf_counter()
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
    s = time.perf_counter() - t0
    os.close(fd)
    print(json.dumps({"bytes": total, "seconds": round(s, 4), "mb_per_s": round(total / s / 1e6, 1)}))

def rand(root, listing, n, seed):
    files = [l.rstrip("\n") for l in open(listing) if l.strip()]
    rng = random.Random(seed)
    lat = []
    for _ in range(n):
        rel, size = files[rng.randrange(len(files))].rsplit(" ", 1)
        off = rng.randrange(max(1, int(size) - 4096))
        t0 = time.perf_counter()
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        os.pread(fd, 4096, off)
        os.close(fd)
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)
    print(json.dumps({"reads": n, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": round(sum(lat) / n, 3)}))

if __name__ == "__main__":
    if sys.argv[1] == "seq":
        seq(sys.argv[2])
    else:
        rand(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
