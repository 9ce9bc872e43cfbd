#!/usr/bin/env python3
"""One training step kernel by kernel, from Nsight Compute's CSV (`scripts/gpu-check.sh timeline`).

ncu ran every kernel of a few queued steps one at a time with the clocks and caches left alone, recording
gpu__time_duration. A step ends with the optimizer kernel (its name matches END, default "adamw"); this prints
the kernels of the last whole step in launch order with their durations, then

  timeline: kernels=N sum_ms=...

The sum is the step's kernel time without the gaps between kernels; ncu leaves the GPU idle between kernels
(each starts at its idle clock and with the L2 as the previous kernel left it), so it is not the step time.
Usage: kernel_timeline.py NCU_CSV [END]
"""
import csv
import sys


def main():
    end = sys.argv[2] if len(sys.argv) > 2 else "adamw"
    rows = []
    with open(sys.argv[1], newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "")
        v = float(r["Metric Value"].replace(",", ""))
        ns = v * {"nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}.get(unit, 1)
        rows.append((int(r["ID"]), r["Kernel Name"], ns))
    rows.sort()
    ends = [i for i, (_, name, _) in enumerate(rows) if end in name]
    if len(ends) < 2:
        print(f"timeline: fewer than two launches matching {end!r} in {len(rows)} kernels")
        return
    step = rows[ends[-2] + 1 : ends[-1] + 1]
    total = 0.0
    for _, name, ns in step:
        total += ns
        print(f"timeline: {ns / 1e3:9.2f} us  {name[:110]}")
    print(f"timeline: kernels={len(step)} sum_ms={total / 1e6:.4f}")


if __name__ == "__main__":
    main()
