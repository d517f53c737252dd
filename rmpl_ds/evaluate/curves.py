"""Training curves from each stage's ``metrics.jsonl``: loss (total and per stream), realized mixture vs target,
learning rate, and for a stage that evaluates while it trains the held-out F1 or loss. One PNG per stage, drawn
with matplotlib's object API on the Agg canvas (no global state)."""

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


def _plot_held_out(axis: Any, evaluated: list[dict[str, Any]], stage: str) -> None:
    """The held-out evaluations during training (rmpl_ds.dev_eval): F1 per task when answers were generated, else
    the held-out loss per stream."""
    steps = [m["step"] for m in evaluated]
    if any("eval_f1_by_task" in m for m in evaluated):
        for index, task in enumerate(sorted({t for m in evaluated for t in m.get("eval_f1_by_task", {})})):
            values = [m.get("eval_f1_by_task", {}).get(task, float("nan")) for m in evaluated]
            axis.plot(steps, values, marker=MARKERS[index % len(MARKERS)], color=f"C{index}", label=f"{task} F1")
        axis.set(title=f"{stage}: held-out F1 (greedy answers)", xlabel="optimizer step", ylabel="F1 (%)")
    else:
        for index, name in enumerate(sorted({n for m in evaluated for n in m["eval_loss_by_stream"]})):
            values = [m["eval_loss_by_stream"].get(name, float("nan")) for m in evaluated]
            axis.plot(steps, values, marker=MARKERS[index % len(MARKERS)], color=f"C{index}", label=name)
        axis.set(title=f"{stage}: held-out loss", xlabel="optimizer step")
    axis.legend(fontsize=7)


def plot_training_curves(run_dir: Path, recipe: Recipe) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for stage in recipe.stages:
        metrics = read_metrics(run_dir / stage.name / "metrics.jsonl")
        if not metrics:
            continue
        steps = [m["step"] for m in metrics]
        evaluated = [m for m in metrics if "eval_loss" in m]
        figure = Figure(figsize=(17 if evaluated else 13, 3.8), layout="constrained")
        FigureCanvasAgg(figure)
        loss_ax, mix_ax, lr_ax, *held_out = figure.subplots(1, 4 if evaluated else 3)
        if held_out:
            _plot_held_out(held_out[0], evaluated, stage.name)
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
