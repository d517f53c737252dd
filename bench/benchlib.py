"""Helpers every benchmark shares: the machine's CPU model and writing a result as JSON + markdown."""

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


def write_results(out: Path, name: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``out/<name>.json`` and ``out/<name>.md`` (``render(report)``) and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = render(report)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)
