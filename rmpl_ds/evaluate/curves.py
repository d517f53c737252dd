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


# Each stream's own marker and line style, so streams that sit on the same values stay apart.
MARKERS = ("o", "s", "^", "v", "D", "x")
LINESTYLES = ("-", "--", "-.", ":")


def _mixture_deviation(metrics: list[dict[str, Any]], stage: Any) -> dict[str, list[float]]:
    """Per stream and step: samples drawn so far minus what the target ratio gives for the same total (the
    sampler keeps it within about one sample; i.i.d. mixing drifts by the square root of the samples)."""
    total_weight = sum(s.weight for s in stage.mixture)
    deviation: dict[str, list[float]] = {s.name: [] for s in stage.mixture}
    for m in metrics:
        seen = m["step"] * stage.global_batch
        for stream in stage.mixture:
            if "realized_share" in m:
                drawn = m["realized_share"].get(stream.name, 0.0) * seen
            else:  # metrics written before realized_share existed: only this run's per-step counts
                drawn = sum(n["stream_counts"].get(stream.name, 0) for n in metrics if n["step"] <= m["step"])
            deviation[stream.name].append(drawn - seen * stream.weight / total_weight)
    return deviation


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
        deviation = _mixture_deviation(metrics, stage)
        for index, stream in enumerate(stage.mixture):
            color = f"C{index}"
            points = [
                (m["step"], m["loss_by_stream"][stream.name]) for m in metrics if stream.name in m["loss_by_stream"]
            ]
            if points:
                loss_ax.plot(*zip(*points, strict=True), color=color, linewidth=1, label=stream.name)
            target = stream.weight / total_weight
            mix_ax.step(
                steps,
                deviation[stream.name],
                where="post",
                color=color,
                marker=MARKERS[index % len(MARKERS)],
                markersize=3,
                linestyle=LINESTYLES[index % len(LINESTYLES)],
                label=f"{stream.name} (target {target:.3f})",
            )
        lr_ax.plot(steps, [m["lr"] for m in metrics], color="C3")
        loss_ax.set(title=f"{stage.name}: loss", xlabel="optimizer step")
        mix_ax.axhline(0.0, color="grey", linewidth=0.8)
        mix_ax.set(
            title="mixture: samples drawn minus the target ratio's",
            xlabel="optimizer step",
            ylabel="realized - target (samples, cumulative)",
            ylim=(-2, 2),
        )
        lr_ax.set(title="learning rate", xlabel="optimizer step")
        loss_ax.legend(fontsize=7)
        mix_ax.legend(fontsize=7)
        path = run_dir / f"curves_{stage.name}.png"
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths
