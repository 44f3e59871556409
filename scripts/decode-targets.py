#!/usr/bin/env python3
"""Where the decode targets stand in one `dsv4-compressor bench --json` run (docs/PERF.md).

The targets, for a decode step of B requests (every request completing a window: `decode`;
none completing: `decode-partial`), Flash and Pro, a CSA layer (main + indexer) and HCA:
  - the library's step (d) within 1.2x the floor (CSA layer) or 1.3x (HCA) for B <= 64,
    and within 1.5x for B = 256 (both scenarios);
  - (d) at least 4x faster than (a), the cast path, at every batch size.
Each row also shows what the reach probe (g) and the least step of the same run say: where
(g) alone exceeds a target (g / floor above the ratio, or (a) / (g) under 4), or the least
step alone takes longer than the target allows, no step with the compressor's data flow as
the probe schedules it meets it, and the row says so ("beyond (g)", "beyond the least step").

Usage: scripts/decode-targets.py BENCH.json   (prints a Markdown table)"""
import json
import sys

FLOOR_TARGET = {"CSA layer": 1.2, "HCA": 1.3}
SPEEDUP_TARGET = 4.0


def floor_target(kind, batch):
    if batch <= 64:
        return FLOOR_TARGET[kind]
    if batch == 256:
        return 1.5
    return None  # no floor target at B = 128


def verdict(measured_ok, reach_ok, least_ok):
    if measured_ok:
        return "met"
    if not least_ok:
        return "beyond the least step"
    if not reach_ok:
        return "beyond (g)"
    return "not met"


def rows_of(run):
    least = run["ceilings"].get("empty_step_us")
    for r in run["rows"]:
        if r["kind"] not in FLOOR_TARGET or r["scenario"] not in ("decode", "decode-partial"):
            continue
        a, d, g, floor = (r.get(k) for k in ("a_bf16_gemm_cast_f32_compress_us", "d_best_us", "g_reach_us", "floor_us"))
        if not (a and d and g and floor):
            raise SystemExit(f"{r['model']} {r['kind']} {r['scenario']} B={r['batch']}: (a), (d), (g) and the floor "
                             "are needed (a GPU run)")
        ft = floor_target(r["kind"], r["batch"])
        floor_v = "-"
        if ft is not None:
            floor_v = verdict(d <= ft * floor, g <= ft * floor, least is None or least <= ft * floor)
        speed_v = verdict(a / d >= SPEEDUP_TARGET, a / g >= SPEEDUP_TARGET,
                          least is None or least <= a / SPEEDUP_TARGET)
        yield r, ft, floor_v, speed_v, a, d, g, floor


def main(path):
    with open(path) as f:
        run = json.load(f)
    rows = list(rows_of(run))
    c = run["ceilings"]
    print(f"{run['device']}, commit {run['commit']}, {run['date']}: copy {c['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, least step {c.get('empty_step_us') or 0:.1f} us")
    print()
    print("| model | kind | scenario | B | floor us | (d) us | (d)/floor | target | (g)/floor | floor target "
          "| (a)/(d) | (a)/(g) | 4x (a) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    met = total = 0
    by_verdict = {"floor": {}, "4x (a)": {}}
    for r, ft, floor_v, speed_v, a, d, g, floor in rows:
        print(f"| {r['model']} | {r['kind']} | {r['scenario']} | {r['batch']} | {floor:.2f} | {d:.2f} | "
              f"{d / floor:.2f} | {'-' if ft is None else f'{ft:.1f}'} | {g / floor:.2f} | {floor_v} | "
              f"{a / d:.2f} | {a / g:.2f} | {speed_v} |")
        for target, v in (("floor", floor_v), ("4x (a)", speed_v)):
            if v != "-":
                total += 1
                met += v == "met"
                by_verdict[target][v] = by_verdict[target].get(v, 0) + 1
    print()
    for target, counts in by_verdict.items():
        kinds = ("met", "not met", "beyond (g)", "beyond the least step")
        print(f"{target} targets: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in kinds))
    print()
    print(f"{met} of {total} targets met")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
