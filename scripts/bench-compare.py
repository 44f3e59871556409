#!/usr/bin/env python3
"""Puts benchmark runs side by side: one line per row (model, kind, step), one column per
label with the median of that label's runs (and their spread where a label has several),
then each later label's change against the first. The runs of an A/B (scripts/ab-bench.sh)
alternate base and tree on one machine, so the columns are comparable; runs from different
machines or days are not.

usage: bench-compare.py [--variant d_best_us] [LABEL=]FILE.json ...
A file without a label is labelled by its name up to the last '-r' (ab-base-r1.json: ab-base).
"""
import argparse
import json
import os
import statistics
import sys


def row_key(r):
    size = f"L={r['prefill_tokens']}" if r.get("scenario") == "prefill" else f"B={r['batch']}"
    return (r["model"], r["kind"], r["scenario"], size)


def label_of(arg):
    if "=" in arg and not os.path.exists(arg):
        label, path = arg.split("=", 1)
        return label, path
    stem = os.path.splitext(os.path.basename(arg))[0]
    cut = stem.rfind("-r")
    if cut > 0 and stem[cut + 2:].isdigit():
        stem = stem[:cut]
    return stem, arg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="d_best_us", help="the row field to compare (default: d_best_us, (d))")
    ap.add_argument("runs", nargs="+", help="[LABEL=]FILE.json")
    a = ap.parse_args()

    labels = []  # in order of first appearance
    values = {}  # (label, key) -> [us]
    keys = []
    devices = set()
    for arg in a.runs:
        label, path = label_of(arg)
        with open(path) as f:
            run = json.load(f)
        devices.add(run.get("device", "?"))
        if label not in labels:
            labels.append(label)
        for r in run["rows"]:
            v = r.get(a.variant)
            if v is None:
                continue
            k = row_key(r)
            if k not in keys:
                keys.append(k)
            values.setdefault((label, k), []).append(v)
    if not keys:
        sys.exit(f"no row has {a.variant}")
    if len(devices) > 1:
        print(f"warning: runs from different devices: {', '.join(sorted(devices))}")

    def cell(label, k):
        vs = values.get((label, k))
        if not vs:
            return None, "-"
        m = statistics.median(vs)
        text = f"{m:.2f}" if len(vs) == 1 else f"{m:.2f} ({min(vs):.2f}-{max(vs):.2f})"
        return m, text

    head = ["model", "kind", "step"] + [f"{l} us" for l in labels] + [f"{l} - {labels[0]}" for l in labels[1:]]
    print(f"{a.variant}, median of each label's runs (min-max where several)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in keys:
        cells = [cell(l, k) for l in labels]
        base = cells[0][0]
        deltas = [f"{c[0] - base:+.2f}" if c[0] is not None and base is not None else "-" for c in cells[1:]]
        print("| " + " | ".join([k[0], k[1], f"{k[2]} {k[3]}"] + [c[1] for c in cells] + deltas) + " |")


if __name__ == "__main__":
    main()
