"""Benchmark: ratio exactness of the slot-stream schedule versus i.i.d. mixing, and its O(1) resume.

Measured in one run:

* the window discrepancy D of our schedule for the paper's ratios (exact, every window of every length), of the
  chairman rule alone, and the largest deviation at N = 16, 32, 256, against i.i.d. categorical mixing: mean and
  p99 over Monte-Carlo windows of max_k |count_k − N·w_k|. The i.i.d. baseline is a numpy simulation of
  independent draws with the mixture's probabilities, the rule webdataset RandomMix, HF
  ``interleave_datasets(probabilities=...)``, torchdata and Energon follow; those libraries are not run here
  (bench_data.py and bench_loader.py run webdataset and HF ``datasets``);
* D for random K-source weightings against Tijdeman's bound 2 − 1/(K−1), and the schedule's construction time;
* resume cost: check the state and resolve the next global batch at slot 10^7 and 10^12 versus slot 0.

Usage: python bench/bench_mixing.py [--windows 200000] [--random 200] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import cpu_model, revision, write_results

from rmpl_ds.mixing import RatioSchedule, SlotStream, chairman_bound, chairman_sequence, window_discrepancy

PAPER_RATIOS = {"1:1:1": (1, 1, 1), "1:1:2": (1, 1, 2), "1:1:0.5": (1, 1, 0.5)}
PAPER_STREAMS = [("ace", 15789), ("swig", 126102), ("mnre", 9201)]
WINDOWS = (16, 32, 256)


def machine() -> dict[str, object]:
    model = cpu_model()
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "numpy": np.__version__}


def iid_deviation(weights: tuple[float, ...], length: int, windows: int, rng: np.random.Generator) -> dict:
    """max_k |count_k − N·w_k| over independent windows of i.i.d. categorical draws."""
    probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = rng.multinomial(length, probabilities, size=windows)
    deviation = np.abs(counts - length * probabilities).max(axis=1)
    return {"mean": float(deviation.mean()), "p99": float(np.quantile(deviation, 0.99)), "max": float(deviation.max())}


def schedule_deviation(schedule: RatioSchedule, length: int) -> dict:
    """The same statistic over every window of `length` slots of our stream (all starts in one period)."""
    period = schedule.period
    sources = schedule.sources(0, period + length)
    targets = np.asarray(schedule.counts) / period
    per_start = np.zeros(period)
    for k in range(len(schedule.counts)):
        running = np.concatenate(([0], np.cumsum(sources == k)))
        in_window = (running[length:] - running[:-length])[:period]
        per_start = np.maximum(per_start, np.abs(in_window - length * targets[k]))
    return {"mean": float(per_start.mean()), "max": float(per_start.max())}


def paper_ratios(windows: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for label, weights in PAPER_RATIOS.items():
        schedule = RatioSchedule(weights)
        chairman = window_discrepancy(chairman_sequence(schedule.counts), schedule.counts)
        names = "ABC"
        row = {
            "ratio": label,
            "period": schedule.period,
            "pattern": " ".join(names[int(k)] for k in schedule.pattern),
            "D": schedule.discrepancy,
            "D_chairman_only": float(chairman),
            "optimal": schedule.optimal,
            "windows": {},
        }
        for length in WINDOWS:
            row["windows"][str(length)] = {
                "slot_stream": schedule_deviation(schedule, length),
                "iid": iid_deviation(weights, length, windows, rng),
            }
        rows.append(row)
    return rows


WEIGHT_FAMILIES = {
    # Weights as a recipe would write them: small integers (periods up to ~24 slots) ...
    "integers 1-4": lambda rng, k: tuple(int(w) for w in rng.integers(1, 5, size=k)),
    # ... or two decimals (periods up to a few hundred slots).
    "two decimals in [0.05, 1]": lambda rng, k: tuple(float(w) for w in np.round(rng.uniform(0.05, 1.0, size=k), 2)),
}


def random_weightings(count: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for family, draw in WEIGHT_FAMILIES.items():
        for num_sources in (3, 4, 5, 6):
            values, times, periods, optimal = [], [], [], 0
            for _ in range(count):
                weights = draw(rng, num_sources)
                started = time.perf_counter()
                schedule = RatioSchedule(weights)
                times.append(time.perf_counter() - started)
                values.append(schedule.discrepancy)
                periods.append(schedule.period)
                optimal += schedule.optimal
            rows.append(
                {
                    "weights": family,
                    "K": num_sources,
                    "weightings": count,
                    "period_median": statistics.median(periods),
                    "D_max": max(values),
                    "D_mean": statistics.fmean(values),
                    "D_below_1": sum(value < 1 for value in values) / count,
                    "bound": chairman_bound(num_sources),
                    "proven_optimal": optimal / count,
                    "build_ms_median": 1000 * statistics.median(times),
                    "build_ms_max": 1000 * max(times),
                }
            )
    return rows


def resume_cost(repeats: int = 20) -> list[dict]:
    streams = [(name, weight, size) for (name, size), weight in zip(PAPER_STREAMS, (1, 1, 2), strict=True)]
    rows = []
    for slot in (0, 10**7, 10**12):
        timings = []
        for _ in range(repeats):
            state = json.loads(json.dumps(SlotStream(streams, seed=1234).state(slot)))
            started = time.perf_counter()
            stream, next_slot = SlotStream(streams, seed=1234).resume(state)
            batch = [stream.resolve(next_slot + offset) for offset in range(64)]
            timings.append(time.perf_counter() - started)
            assert len(batch) == 64
        rows.append({"slot": slot, "resume_and_first_batch_ms_median": 1000 * statistics.median(timings)})
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Mixing benchmark",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']['nproc']} CPUs, {report['machine']['cpu']}, Python "
        f"{report['machine']['python']}, numpy {report['machine']['numpy']}",
        f"- date: {report['date']}",
        f"- code: rmpl_ds at {report['revision']}",
        "",
        "## Window deviation max_k |count_k − N·w_k|: slot stream versus i.i.d. mixing",
        "",
        f"i.i.d.: a numpy simulation of independent categorical draws with the mixture's probabilities (the rule of "
        f"webdataset RandomMix and HF interleave_datasets(probabilities=...); the libraries are not run), "
        f"{report['iid_windows']} Monte-Carlo windows per cell. Slot stream: every window (exact); a window whose "
        "length is a multiple of the period holds the exact counts (deviation 0).",
        "",
        "| ratio | period | D (all windows) | D chairman rule alone | "
        + " | ".join(f"N={n}: ours max / i.i.d. (simulated) mean / p99" for n in WINDOWS)
        + " |",
        "|---|---|---|---|" + "---|" * len(WINDOWS),
    ]
    for row in report["paper_ratios"]:
        cells = []
        for length in WINDOWS:
            cell = row["windows"][str(length)]
            cells.append(f"{cell['slot_stream']['max']:.2f} / {cell['iid']['mean']:.1f} / {cell['iid']['p99']:.1f}")
        lines.append(
            f"| {row['ratio']} | {row['period']} `{row['pattern']}` | {row['D']:.3f} | {row['D_chairman_only']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "## Random weightings: D versus Tijdeman's bound",
        "",
        "| weights | K | weightings | median period | D max | D mean | share with D < 1 | bound 2 − 1/(K−1) "
        "| proven optimal | build ms median / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["random_weightings"]:
        lines.append(
            f"| {row['weights']} | {row['K']} | {row['weightings']} | {row['period_median']:.0f} | "
            f"{row['D_max']:.3f} | {row['D_mean']:.3f} | {row['D_below_1']:.0%} | {row['bound']:.3f} | "
            f"{row['proven_optimal']:.0%} | "
            f"{row['build_ms_median']:.1f} / {row['build_ms_max']:.1f} |"
        )
    lines += ["", "## Resume cost (check state + resolve the next 64 slots)", "", "| slot | ms (median) |", "|---|---|"]
    for row in report["resume"]:
        lines.append(f"| {row['slot']:.0e} | {row['resume_and_first_batch_ms_median']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=200_000, help="Monte-Carlo windows for the i.i.d. baseline")
    parser.add_argument("--random", type=int, default=200, help="random weightings per K")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "iid_windows": args.windows,
        "paper_ratios": paper_ratios(args.windows, rng),
        "random_weightings": random_weightings(args.random, rng),
        "resume": resume_cost(),
    }
    write_results(args.out, "mixing", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
