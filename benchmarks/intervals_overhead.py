"""What the intervals cost: time in the interval functions while a study's report is written.

    python benchmarks/intervals_overhead.py runs/default

The scoring is the same with or without intervals (per-example sums come out of the same
forward passes); the new cost is bootstrap arithmetic in the report stage. Prints the report's
wall time, the cumulative time of each interval function (under cProfile, which inflates it),
and their sum as a share of the study's wall time when `study_seconds` is given.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

FUNCTIONS = {"sweep_intervals", "chrf_intervals", "comparison_table", "conditional_gain_table", "ends_sentence"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study folder written by `cogprobe run`")
    parser.add_argument("--study-seconds", type=float, help="the study's wall time, for the share")
    args = parser.parse_args()
    from cogprobe.study.report import write_report
    profile, start = cProfile.Profile(), time.perf_counter()
    profile.enable()
    write_report(args.study)
    profile.disable()
    total = time.perf_counter() - start
    spent = {fn: ct for (_, _, fn), (_, _, _, ct, _) in pstats.Stats(profile).stats.items() if fn in FUNCTIONS}
    print(f"report stage {total:.1f} s; interval functions (cumulative, profiled): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(spent.items())))
    if args.study_seconds:
        print(f"intervals: {sum(spent.values()):.1f} s = {sum(spent.values()) / args.study_seconds:.1%} of the study")


if __name__ == "__main__":
    main()
