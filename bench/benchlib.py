"""Helpers every benchmark shares: the machine's CPU model, the code revision measured, and writing a result as JSON +
markdown."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where that is unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def revision() -> str:
    """The commit measured, and the package files that differ from it (read-only git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "rmpl_ds", "launch").splitlines()]
    return commit + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def write_results(out: Path, name: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/<name>.json`` and ``out/<name>.md`` (``render(report)``) and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = render(report)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of per-round ratios (the paired comparisons every benchmark reports)."""
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_cell(row: dict[str, float] | None, baseline: str = "1 (baseline)") -> str:
    """A :func:`spread` as a table cell, ``1.23x [1.01, 1.40]``; ``baseline`` for the reference row."""
    if row is None:
        return baseline
    return f"{row['median']:.2f}x [{row['min']:.2f}, {row['max']:.2f}]"
