#!/usr/bin/env python3
"""Where the decode targets stand in a `dsv4-compressor bench --json` run (docs/PERF.md), or in
a full run with the rows of later, partial runs put in its place.

The targets, for a decode step of B requests (every request completing a window: `decode`;
none completing: `decode-partial`), Flash and Pro, a CSA layer (main + indexer) and HCA:
  - the library's step (d) within 1.2x the floor (CSA layer) or 1.3x (HCA) for B <= 64,
    and within 1.5x for B = 256 (both scenarios);
  - (d) at least 4x faster than (a), the cast path, at every batch size.
Each row also shows what the reach probe (g) and the least step of the same run say: where
(g) alone exceeds a target (g / floor above the ratio, or (a) / (g) under 4), or the least
step alone takes longer than the target allows, no step with the compressor's data flow as
the probe schedules it meets it, and the row says so ("beyond (g)", "beyond the least step").

Later runs replace the first run's rows of the same model, kind, scenario and batch, each
judged against its own run (its floor, probe and least step); rows the first run lacks are
left out, so the count of targets stays the first run's. The "run" column names the run.
The closest unmet targets that (g) and the least step allow follow the counts, with the (d)
each needs.

Usage: scripts/decode-targets.py BENCH.json [LATER.json ...]   (prints a Markdown table)"""
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


def key_of(r):
    return r["model"], r["kind"], r["scenario"], r["batch"]


def main(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    for k, run in enumerate(runs):
        c = run["ceilings"]
        tag = f"run {k + 1} ({path_name(paths[k])}): " if len(runs) > 1 else ""
        print(f"{tag}{run['device']}, commit {run['commit']}, {run['date']}: copy {c['copy_gbps']:.0f} GB/s, "
              f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, least step {c.get('empty_step_us') or 0:.1f} us")
    # The first run's rows, in its order, each from the last run that has it.
    rows = {key_of(row[0]): (row, 1) for row in rows_of(runs[0])}
    left_out = 0
    for k, run in enumerate(runs[1:], start=2):
        for row in rows_of(run):
            if key_of(row[0]) in rows:
                rows[key_of(row[0])] = (row, k)
            else:
                left_out += 1
    if left_out:
        print(f"({left_out} rows of later runs that the first run lacks are left out)")
    print()
    run_col = len(runs) > 1
    print(("| run " if run_col else "") + "| model | kind | scenario | B | floor us | (d) us | (d)/floor | target "
          "| (g)/floor | floor target | (a)/(d) | (a)/(g) | 4x (a) |")
    print(("|---" if run_col else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    met = total = 0
    by_verdict = {"floor": {}, "4x (a)": {}}
    near = []  # (relative gap, text) of unmet targets that (g) and the least step allow
    for (r, ft, floor_v, speed_v, a, d, g, floor), k in rows.values():
        label = f"{r['model']} {r['kind']} {r['scenario']} B={r['batch']}"
        if floor_v == "not met":
            near.append((d / (ft * floor) - 1, f"{label}: floor target needs (d) <= {ft * floor:.2f} us, is {d:.2f}"))
        if speed_v == "not met":
            near.append((d / (a / SPEEDUP_TARGET) - 1, f"{label}: 4x (a) needs (d) <= {a / SPEEDUP_TARGET:.2f} us, is {d:.2f}"))
        print((f"| {k} " if run_col else "") +
              f"| {r['model']} | {r['kind']} | {r['scenario']} | {r['batch']} | {floor:.2f} | {d:.2f} | "
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
    if near:
        print()
        print("Closest of the unmet targets with room by (g):")
        for gap, text in sorted(near)[:6]:
            print(f"- {text} ({100 * gap:.0f}% over)")


def path_name(path):
    return path.rsplit("/", 1)[-1]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
