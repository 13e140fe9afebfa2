#!/usr/bin/env python3
"""Summarises gpu-run.sh's ncu.log (ncu --csv --page details) as a Markdown table: one row per
profiled launch with its block, grid, duration, DRAM throughput and occupancy.
usage: scripts/ncu-summary.py ncu.log > ncu-summary.md"""
import csv
import sys

METRICS = ["Duration", "DRAM Throughput", "Achieved Occupancy",
           "Theoretical Occupancy", "Registers Per Thread"]
lines = (l for l in open(sys.argv[1], errors="replace") if l.startswith('"'))
launches = {}
for row in csv.DictReader(lines):
    k = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"], "block": row["Block Size"],
                                        "grid": row["Grid Size"]})
    if row["Metric Name"] in METRICS:
        k[row["Metric Name"]] = row["Metric Value"]
print("ncu (--clock-control none; SpeedOfLight, MemoryWorkloadAnalysis, Occupancy), first launch "
      "of each kernel in `cunorm bench --reps 1` (the first standard shape of each op). Duration "
      "in ns, throughputs and occupancy in %.\n")
print("| id | kernel | block | grid | " + " | ".join(METRICS) + " |")
print("|---" * (4 + len(METRICS)) + "|")
for i, k in sorted(launches.items(), key=lambda kv: int(kv[0])):
    print(f"| {i} | {k['kernel']} | {k['block']} | {k['grid']} | " +
          " | ".join(k.get(m, "") for m in METRICS) + " |")
