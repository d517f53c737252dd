"""Training curves from each stage's ``metrics.jsonl``: loss (total and per stream), realized mixture vs target,
learning rate. One PNG per stage, drawn with matplotlib's object API on the Agg canvas (no global state)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmpl_ds.config import Recipe


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-step metrics of a stage; a resumed run appends, so the last line of each step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_training_curves(run_dir: Path, recipe: Recipe) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for stage in recipe.stages:
        metrics = read_metrics(run_dir / stage.name / "metrics.jsonl")
        if not metrics:
            continue
        steps = [m["step"] for m in metrics]
        figure = Figure(figsize=(13, 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        loss_ax, mix_ax, lr_ax = figure.subplots(1, 3)
        loss_ax.plot(steps, [m["loss"] for m in metrics], color="black", linewidth=2, label="total")
        total_weight = sum(s.weight for s in stage.mixture)
        cumulative = {s.name: 0 for s in stage.mixture}
        seen = 0
        realized: dict[str, list[float]] = {s.name: [] for s in stage.mixture}
        for m in metrics:
            seen += sum(m["stream_counts"].values())
            for name in cumulative:
                cumulative[name] += m["stream_counts"].get(name, 0)
                realized[name].append(cumulative[name] / seen)
        for index, stream in enumerate(stage.mixture):
            color = f"C{index}"
            points = [
                (m["step"], m["loss_by_stream"][stream.name]) for m in metrics if stream.name in m["loss_by_stream"]
            ]
            if points:
                loss_ax.plot(*zip(*points, strict=True), color=color, linewidth=1, label=stream.name)
            mix_ax.plot(steps, realized[stream.name], color=color, label=f"{stream.name} realized")
            mix_ax.axhline(stream.weight / total_weight, color=color, linestyle="--", linewidth=1)
        lr_ax.plot(steps, [m["lr"] for m in metrics], color="C3")
        loss_ax.set(title=f"{stage.name}: loss", xlabel="optimizer step")
        top = max(s.weight for s in stage.mixture) / total_weight
        mix_ax.set(
            title="mixture: realized (solid) vs target (dashed)",
            xlabel="optimizer step",
            ylabel="share",
            ylim=(0, min(1.0, 1.6 * top)),
        )
        lr_ax.set(title="learning rate", xlabel="optimizer step")
        loss_ax.legend(fontsize=7)
        mix_ax.legend(fontsize=7)
        path = run_dir / f"curves_{stage.name}.png"
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths
