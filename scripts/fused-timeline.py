#!/usr/bin/env python3
"""Summarizes the fused step's per-block phase stamps (a DSV4_FUSED_TIMELINE build writes them
to $DSV4_FUSED_TIMELINE_CSV at exit): for each plan's last launch, when its blocks started,
when the wait for the previous kernel returned, when the first projection pass had its data,
when each kind of item ended, and when blocks exited; microseconds from the first plan's first
start. In the benchmark the plans are the weight copies of one graph, launched in order."""
import csv
import statistics
import sys

KINDS = {0: "projection", 1: "pool", 2: "entry", 3: "idle"}


def main(path, first=0, last=1 << 30):
    plans = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            p = int(row["plan"])
            if first <= p <= last:
                plans.setdefault(p, []).append({k: int(v) for k, v in row.items()})
    # Plans never launched (a row's plans that a graph did not use) have no stamps.
    plans = {p: blocks for p, blocks in plans.items() if any(b["start"] for b in blocks)}
    starts = [b["start"] for blocks in plans.values() for b in blocks if b["start"]]
    if not starts:
        sys.exit("no stamps")
    t0 = min(starts)

    def us(t):
        return (t - t0) / 1000.0

    def span(values):
        values = sorted(us(v) for v in values if v)
        if not values:
            return "-"
        return f"{values[0]:7.2f} {statistics.median(values):7.2f} {values[-1]:7.2f}"

    print("per plan: min / median / max in us; blocks by their first item")
    for p in sorted(plans):
        blocks = plans[p]
        print(f"plan {p}: {len(blocks)} blocks, {blocks[0]['staged_kblocks']} k blocks staged, "
              f"started {us(min(b['start'] for b in blocks if b['start'])):.2f}")
        print(f"  start            {span(b['start'] for b in blocks)}")
        print(f"  wait returned    {span(b['waited'] for b in blocks)}")
        for kind, marks in ((0, ("x + weights in smem", "products summed")),
                            (1, ("slices/rows in smem", "pooled written", "state updated")),
                            (2, ("pooled in hand", "normed and roped", "stores issued"))):
            mine = [b for b in blocks if b["first_item"] == kind]
            if not mine:
                continue
            print(f"  {KINDS[kind]} items ({len(mine)} blocks)")
            if kind == 1 and any(b.get("staged") for b in mine):  # builds before the stamp lack it
                print(f"    {'plan staged':<20} {span(b['staged'] for b in mine)}")
            for field, label in zip(("mark1", "mark2", "mark3"), marks):
                if any(b.get(field) for b in mine):
                    print(f"    {label:<20} {span(b[field] for b in mine)}")
            print(f"    {'end':<20} {span(b['first_end'] for b in mine)}")
        print(f"  exit             {span(b['exit'] for b in blocks)}")

if __name__ == "__main__":
    # usage: fused-timeline.py FILE [FIRST LAST]  (plans FIRST..LAST only)
    args = sys.argv[1:]
    main(args[0] if args else "timeline.csv", *(int(a) for a in args[1:3]))
