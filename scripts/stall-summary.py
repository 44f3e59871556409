#!/usr/bin/env python3
"""Where one kernel's warps wait, from Nsight Compute's source page of a profile.

Reads the CSV that `ncu --import R.ncu-rep --page source --csv --print-source sass` writes
(scripts/device-check.sh's profile stage keeps it as logs/profile-source.csv) and prints the
warp stall samples by reason, then the instructions with the most samples and, for each of the
leading reasons, the instructions that collect it. A sample is one warp's state at one moment,
so the shares say where the warps' time goes, not what bounds the kernel's duration.

usage: scripts/stall-summary.py SOURCE.csv [TOP]      (TOP: instructions listed, default 25)
"""
import csv
import sys
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text):
    try:
        return int(float(text.replace(",", "")))
    except ValueError:
        return 0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(f))
    kernel = rows[0][1] if rows and rows[0] and rows[0][0] == "Kernel Name" else "?"
    header_at = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if header_at is None:
        sys.exit(f"{sys.argv[1]}: no 'Address' header row: not an ncu source page CSV")
    header = rows[header_at]
    data = [r for r in rows[header_at + 1:] if len(r) == len(header)]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]
    if SAMPLES not in col or not reasons:
        sys.exit(f"{sys.argv[1]}: no stall sampling columns (profile with --set full)")

    by_reason = Counter()
    for r in data:
        for s in reasons:
            by_reason[s] += number(r[col[s]])
    samples = sum(number(r[col[SAMPLES]]) for r in data)
    executed = sum(number(r[col[EXECUTED]]) for r in data) if EXECUTED in col else 0
    code_bytes = int(data[-1][0], 16) - int(data[0][0], 16) + 16 if data else 0
    print(f"kernel: {kernel}")
    print(f"{samples} stall samples, {executed} warp instructions executed, {code_bytes} bytes of code")
    if samples == 0:
        return
    print("\nby reason:")
    for s, n in by_reason.most_common():
        if n:
            print(f"  {s:26s} {n:7d}  {100.0 * n / samples:5.1f}%")

    base = int(data[0][0], 16)

    def line(r, reason=None):
        n = number(r[col[reason]]) if reason else number(r[col[SAMPLES]])
        lead = sorted(((number(r[col[s]]), s[6:]) for s in reasons if number(r[col[s]])), reverse=True)[:3]
        count = number(r[col[EXECUTED]]) if EXECUTED in col else 0
        where = ", ".join(f"{s} {k}" for k, s in lead)
        return f"  +{int(r[0], 16) - base:#07x} {n:5d} {count:8d}  {r[1].strip()[:56]:56s} {where}"

    print(f"\ntop {top} instructions by samples (offset, samples, times executed by warps, SASS, leading reasons):")
    for r in sorted(data, key=lambda r: -number(r[col[SAMPLES]]))[:top]:
        if number(r[col[SAMPLES]]):
            print(line(r))
    for s, n in by_reason.most_common(4):
        if not n:
            continue
        print(f"\n{s}: the instructions that collect it")
        for r in sorted(data, key=lambda r: -number(r[col[s]]))[:6]:
            if number(r[col[s]]):
                print(line(r, s))


if __name__ == "__main__":
    main()
