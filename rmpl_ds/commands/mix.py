"""Show how a mixture of weighted streams fills the slot stream.

Prints the period the sampler uses, the realized count of each stream after N slots, the largest deviation
from the target count over every window of W slots and over every window of any length (the window
discrepancy D), and each stream's source-epochs after N slots.

Examples:
  rmpl-ds mix --weights 1:1:2 --sizes 15789,126102,9201 --slots 100000 --window 32
  rmpl-ds mix --weights ace=1,swig=1,mnre=2 --sizes 15789,126102,9201 --slots 100000 --window 32 --json
  rmpl-ds mix --weights 1:1:0.5 --dump-sources 20
"""

from __future__ import annotations

import argparse
import json
import math
import string

from rmpl_ds.errors import UserError

HELP = "show how a weighted mixture fills the slot stream (counts, window deviation, epochs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        required=True,
        help="ratios as 1:1:2 (streams named A, B, C, ...) or as name=weight pairs: ace=1,swig=1,mnre=2",
    )
    parser.add_argument("--sizes", help="samples per stream, comma-separated in the order of --weights (for epochs)")
    parser.add_argument("--slots", type=int, default=100_000, help="slots to account for (default 100000)")
    parser.add_argument("--window", type=int, default=32, help="window length W in slots (default 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--dump-sources",
        type=int,
        metavar="K",
        help="print the stream index of each of the first K slots on one line (with --json: a 'sources' key)",
    )


def parse_weights(text: str) -> tuple[list[str], list[float]]:
    """``"1:1:2"`` → (["A", "B", "C"], [1, 1, 2]); ``"ace=1,swig:EM=2"`` → (["ace", "swig:EM"], [1, 2]).

    Stream names may contain ``:`` (``source:task``), so the named form is recognized by its ``=``.

    Raises:
        UserError: an empty or non-numeric weight, or a repeated name.
    """
    if "=" in text:
        names, values = [], []
        for item in text.split(","):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise UserError(f"--weights: expected name=weight pairs separated by commas, found {item!r}")
            names.append(name.strip())
            values.append(value)
        if len(set(names)) != len(names):
            raise UserError(f"--weights: a stream name appears twice in {text!r}")
    else:
        values = text.split(":")
        letters = len(values) <= len(string.ascii_uppercase)
        names = list(string.ascii_uppercase[: len(values)]) if letters else [f"s{i}" for i in range(len(values))]
    weights = []
    for name, value in zip(names, values, strict=True):
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"--weights: the weight of {name} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"--weights: the weight of {name} must be a finite number ≥ 0, found {value!r}")
        weights.append(weight)
    return names, weights


def _parse_sizes(text: str, count: int) -> list[int]:
    try:
        sizes = [int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated integers, found {text!r}") from None
    if len(sizes) != count:
        raise UserError(f"--sizes: expected {count} sizes (one per weight), found {len(sizes)}")
    if min(sizes) < 1:
        raise UserError(f"--sizes: expected sizes ≥ 1, found {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from rmpl_ds.mixing import RatioSchedule, SlotStream

    names, weights = parse_weights(args.weights)
    if args.slots < 1:
        raise UserError(f"--slots: expected ≥ 1, found {args.slots}")
    if not 1 <= args.window <= args.slots:
        raise UserError(f"--window: expected 1 ≤ W ≤ --slots ({args.slots}), found {args.window}")
    schedule = RatioSchedule(weights)
    sizes = _parse_sizes(args.sizes, len(names)) if args.sizes else None

    if args.dump_sources is not None and not args.json:
        if args.dump_sources < 0:
            raise UserError(f"--dump-sources: expected K ≥ 0, found {args.dump_sources}")
        print(" ".join(str(int(source)) for source in schedule.sources(0, args.dump_sources)))
        return 0

    period = schedule.period
    targets = np.asarray(schedule.counts, dtype=np.float64) / period
    counts = {name: schedule.count_before(args.slots, k) for k, name in enumerate(names)}
    # Windows starting o and o + B are identical, so the realized windows of the first N slots are those starting
    # in [0, min(N − W, B − 1)].
    stop = min(args.slots, period - 1 + args.window)
    sources = schedule.sources(0, stop)
    realized = 0.0
    for k in range(len(names)):
        running = np.concatenate(([0], np.cumsum(sources == k)))
        in_window = running[args.window :] - running[: -args.window]
        realized = max(realized, float(np.abs(in_window - args.window * targets[k]).max()))
    epochs = None
    if sizes is not None:
        stream = SlotStream(list(zip(names, weights, sizes, strict=True)), seed=0)
        epochs = {name: round(value, 6) for name, value in stream.epochs_at(args.slots).items()}

    report = {
        "weights": dict(zip(names, weights, strict=True)),
        "period": period,
        "pattern": [names[int(source)] for source in schedule.pattern[:64]],
        "slots": args.slots,
        "window": args.window,
        "max_window_deviation": round(realized, 6),
        "max_window_deviation_any_start": round(schedule.window_deviation(args.window), 6),
        "discrepancy": round(schedule.discrepancy, 6),
        "discrepancy_bound": round(schedule.bound, 6),
        "optimal": schedule.optimal,
        "counts": counts,
        "epochs": epochs,
    }
    if args.dump_sources is not None:
        report["sources"] = [int(source) for source in schedule.sources(0, max(args.dump_sources, 0))]
    if args.json:
        print(json.dumps(report))
        return 0

    print(f"mixture {schedule.describe(names)}")
    print(f"after {args.slots} slots:")
    print(f"  {'stream':<12} {'weight':>8} {'target':>12} {'count':>10} {'epochs':>10}")
    for k, name in enumerate(names):
        epoch_text = f"{epochs[name]:>10.3f}" if epochs is not None else f"{'-':>10}"
        print(f"  {name:<12} {targets[k]:>8.4f} {args.slots * targets[k]:>12.1f} {counts[name]:>10d} {epoch_text}")
    print(f"max deviation over windows of {args.window} slots: {realized:.3f} (in the first {args.slots} slots)")
    print(f"max deviation over all windows of any length (D): {schedule.discrepancy:.3f} (bound {schedule.bound:.3f})")
    return 0
