# Sums an `ncu --metrics gpu__time_duration.sum --csv` log by kernel: total, launches and mean per kernel name,
# most time first (the device profiling scripts call it). Usage: python3 bench/ncu_summary.py LOG.csv [ROWS [STEPS]]
# STEPS: the decode steps the log holds; the bench's noise fill is then left out and times are per step.
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
header = rows[0]; rows = rows[1:]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 0
k = header.index("Kernel Name"); v = header.index("Metric Value"); u = header.index("Metric Unit")
# ncu names units by its version: "nsecond" (2022) or "ns" (2025).
MICROSECONDS_PER_UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
total = collections.defaultdict(float); count = collections.Counter()
for r in rows:
    value = float(r[v].replace(",", "")) * MICROSECONDS_PER_UNIT[r[u]]
    name = r[k].split("(")[0][:70]
    if steps and "noise" in name: continue
    total[name] += value / max(steps, 1); count[name] += 1
s = sum(total.values())
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
print(f"{len(rows)} kernels, {s:.0f} us" + (f" per decode step ({steps} steps)" if steps else ""))
for name, t in sorted(total.items(), key=lambda x: -x[1])[:top]:
    print(f"{t:10.1f} us {count[name]:5d}x {t * max(steps, 1) / count[name]:8.2f} us  {name}")
