#!/usr/bin/env python3
"""Summarizes the sliced projection's and the running step's per-block phase stamps (a
DSV4_FUSED_TIMELINE build writes each kernel's last launch to $DSV4_STEP_TIMELINE_CSV at
exit): for each kernel, when its blocks started, when the wait for the previous kernel
returned, its two marks, and when blocks exited; microseconds from the earliest start.
Run one benchmark row (e.g. `bench --filter 'flash HCA decode B=64' --batches 64`): each
kernel's array holds its last launch, and blocks beyond that launch's grid are dropped.
The last launch is the graph's last step: no projection follows its running step, so that
running step runs alone, while every earlier one shares the SMs with the next step's
projection blocks. The period is therefore not this step's chain: compare the chain (the
projection's wait to the running step's last exit, plus the next wait's ~0.6 us) with the
bench's time per step; the difference is what the overlap costs the earlier steps.
For the sliced projection it then lists its multiply loop atom by atom: when each atom's x
was in shared memory for the whole block, from the block's own wait, and the gap to the
atom before (min / median / max over blocks)."""
import csv
import statistics
import sys

ATOMS = 16  # kStepTimelineAtoms (src/cuda/step_timeline.hpp)
MARKS = {
    "slice_projection": ("weights + x atom 0", "products done"),
    "running_step": ("loads issued", "pooled in hand"),
}


def main(path):
    kernels = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            block = {k: (v if k == "kernel" else int(v)) for k, v in row.items()}
            kernels.setdefault(block["kernel"], []).append(block)
    if not kernels:
        sys.exit("no stamps")
    for name, blocks in kernels.items():
        # An earlier, larger launch leaves stamps past the last launch's grid, and one with
        # more atoms leaves atom stamps older than this launch's start.
        last = max(blocks, key=lambda b: b["start"])["blocks"]
        kernels[name] = [b for b in blocks if b["block"] < last]
        for b in kernels[name]:
            b["atoms"] = [b[f"atom{a}"] for a in range(ATOMS) if f"atom{a}" in b and b[f"atom{a}"] >= b["start"]]
    t0 = min(b["start"] for blocks in kernels.values() for b in blocks)

    def span(values):
        values = sorted((v - t0) / 1000.0 for v in values if v)
        if not values:
            return "-"
        return f"{values[0]:7.2f} {statistics.median(values):7.2f} {values[-1]:7.2f}"

    def spread(values):
        values = sorted(values)
        return f"{values[0]:6.2f} {statistics.median(values):6.2f} {values[-1]:6.2f}" if values else "-"

    print("per kernel: min / median / max in us from the earliest start")
    for name in sorted(kernels, key=lambda n: min(b["start"] for b in kernels[n])):
        blocks = kernels[name]
        print(f"{name}: {len(blocks)} blocks on {len({b['sm'] for b in blocks})} SMs")
        labels = MARKS.get(name, ("mark1", "mark2"))
        for field, label in (("start", "start"), ("waited", "wait returned"), ("mark1", labels[0]),
                             ("mark2", labels[1]), ("exit", "exit")):
            print(f"  {label:<20} {span(b[field] for b in blocks)}")
        # Blocks that share an SM split its copy and issue rates: their exits by how many
        # blocks of this launch each SM held.
        per_sm = {}
        for b in blocks:
            per_sm.setdefault(b["sm"], []).append(b)
        by_load = {}  # blocks an SM held -> those SMs' blocks
        for sm_blocks in per_sm.values():
            by_load.setdefault(len(sm_blocks), []).append(sm_blocks)
        for k, sms in sorted(by_load.items()):
            held = [b for sm_blocks in sms for b in sm_blocks]
            print(f"  {len(sms)} SMs held {k}: exit {span(b['exit'] for b in held)},"
                  f" wait to exit {spread([(b['exit'] - b['waited']) / 1000.0 for b in held if b['waited']])}")
        atoms = max(len(b["atoms"]) for b in blocks)
        if atoms:
            print("  multiply loop: atom's x in shared memory, us after the block's wait; gap to the atom before")
            for a in range(atoms):
                have = [b for b in blocks if len(b["atoms"]) > a and b["waited"]]
                after = [(b["atoms"][a] - b["waited"]) / 1000.0 for b in have]
                gap = [(b["atoms"][a] - b["atoms"][a - 1]) / 1000.0 for b in have] if a else []
                print(f"    atom {a:2d}  {spread(after)}   gap {spread(gap) if gap else '-'}")


if __name__ == "__main__":
    # usage: step-timeline.py FILE
    main(sys.argv[1] if len(sys.argv) > 1 else "step-timeline.csv")
