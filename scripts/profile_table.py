#!/usr/bin/env python3
"""Per-kernel table from an `ncu --csv --page raw` run of moetrace.

Kernels are split into steps at each `embedding_*` launch (the first
kernel of every step); those before the first are the set-up. For the first step (prefill) and the last (a decode
step) prints each kernel's count, time, DRAM bytes and achieved bandwidth
against the H100's 3.0 TB/s copy rate, and the step's totals.
"""
import csv
import sys
from collections import OrderedDict

COPY_RATE = 3.0e12

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
reader = csv.DictReader(lines)
for r in reader:
    def number(key):
        return float((r.get(key) or "0").replace(",", ""))

    try:
        t = number("gpu__time_duration.sum")  # ns
    except ValueError:
        continue  # the units row
    name = r.get("Kernel Name", "?")
    read, write = number("dram__bytes_read.sum"), number("dram__bytes_write.sum")
    rows.append((name, t, read + write))

setup, steps = [], []
for name, t, b in rows:
    if name.startswith("embedding"):
        steps.append([])
    (steps[-1] if steps else setup).append((name, t, b))

def table(title, step):
    agg = OrderedDict()
    for name, t, b in step:
        short = name.split("(")[0][:60]
        c, tt, bb = agg.get(short, (0, 0.0, 0.0))
        agg[short] = (c + 1, tt + t, bb + b)
    total_t = sum(t for _, t, _ in step)
    total_b = sum(b for _, _, b in step)
    print(f"== {title}: {len(step)} kernels, {total_t / 1e3:.1f} us of kernel time, "
          f"{total_b / 1e6:.1f} MB DRAM, {total_b / max(total_t, 1):.0f} GB/s "
          f"= {100 * total_b / max(total_t, 1) / (COPY_RATE / 1e9):.0f}% of {COPY_RATE / 1e12:.1f} TB/s")
    print(f"{'kernel':60} {'n':>4} {'us':>9} {'avg us':>8} {'MB':>8} {'TB/s':>6}")
    for short, (c, t, b) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{short:60} {c:4} {t / 1e3:9.1f} {t / c / 1e3:8.2f} {b / 1e6:8.2f} {b / max(t, 1) / 1e3:6.2f}")

if not steps:
    print("no step found")
    sys.exit(1)
if setup:
    table("set-up (weights generated on the device)", setup)
table("first step (prefill)", steps[0])
table("last step (decode)", steps[-1])
