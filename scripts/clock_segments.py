#!/usr/bin/env python3
"""Clocks and power per segment of a GPU run: what `scripts/gpu-check.sh perf` sampled.

Reads the nvidia-smi samples (`timestamp_s, sm_mhz, mem_mhz, power_w, temp_c, throttle_bitmask`, one line
every 100 ms) and the segment markers (`mark <unix seconds> <label>`, written before and after each program),
and prints one line per segment:

  clocks: segment="<label>" samples=N sm_mhz_median=... sm_mhz_min=... power_w_mean=... temp_c_max=... throttle=<reasons>
          busy_samples=... busy_sm_mhz_median=... busy_power_w_median=...

(busy: the samples at no less than half the segment's peak power, which leaves out start-up and idle gaps)

so that a slower pass can be told apart from a GPU that ran slower (power or thermal capping) at the time.
Usage: clock_segments.py SAMPLES MARKS
"""
import statistics
import sys

# nvidia-smi's clocks_event_reasons bits (nvml.h, nvmlClocksEventReason*).
REASONS = {
    0x1: "idle",
    0x2: "app_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


def main():
    samples = []
    for line in open(sys.argv[1]):
        parts = [p.strip() for p in line.split(",")]
        try:
            t, sm, mem, pw, temp = (float(p.split()[0]) for p in parts[:5])
            mask = int(parts[5], 16) if parts[5].startswith("0x") else int(parts[5])
        except (ValueError, IndexError):
            continue
        samples.append((t, sm, mem, pw, temp, mask))
    marks = []
    for line in open(sys.argv[2]):
        f = line.split(maxsplit=2)
        if len(f) == 3 and f[0] == "mark":
            marks.append((float(f[1]), f[2].strip()))
    for (t0, label), (t1, _) in zip(marks, marks[1:]):
        seg = [s for s in samples if t0 <= s[0] < t1]
        if not seg or label.startswith("end "):
            continue
        mask = 0
        for s in seg:
            mask |= s[5]
        why = "+".join(n for b, n in REASONS.items() if mask & b) or "none"
        # The busy samples: at least half the segment's peak power (leaves out start-up, compiling and idle gaps).
        peak = max(s[3] for s in seg)
        busy = [s for s in seg if s[3] >= 0.5 * peak]
        print(
            f'clocks: segment="{label}" samples={len(seg)} '
            f"sm_mhz_median={statistics.median(s[1] for s in seg):.0f} sm_mhz_min={min(s[1] for s in seg):.0f} "
            f"power_w_mean={statistics.mean(s[3] for s in seg):.0f} power_w_max={peak:.0f} "
            f"temp_c_max={max(s[4] for s in seg):.0f} throttle={why} busy_samples={len(busy)} "
            f"busy_sm_mhz_median={statistics.median(s[1] for s in busy):.0f} "
            f"busy_power_w_median={statistics.median(s[3] for s in busy):.0f}"
        )


if __name__ == "__main__":
    main()
