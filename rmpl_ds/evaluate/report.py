"""M2E2 reports: the paper's Table 2 as markdown, a bar chart of F1 per setting, and the same numbers in TensorBoard.

Every function takes scores as the `rmpl-ds score --json` object (:meth:`~rmpl_ds.evaluate.m2e2.M2E2Scores.to_json`),
so a report can be rebuilt from saved ``scores.json`` files without the gold or the predictions. Models appear in
the order of the ``results`` mapping.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmpl_ds import atomic
from rmpl_ds.evaluate.m2e2 import METRICS, SETTINGS, TASKS, UNION_SETTINGS, M2E2Scores

SETTING_TITLES: dict[str, str] = {"text_only": "Text-only", "image_only": "Image-only", "multimedia": "Multimedia"}
SETTING_LETTERS: dict[str, str] = {"text_only": "T", "image_only": "I", "multimedia": "M"}
# What each chart panel shows: (task, metric, title). Event mention is shown both ways because the paper's event
# mention metric is macro-F1 while Table 2's F1 columns are micro.
CHART_PANELS: tuple[tuple[str, str, str], ...] = (
    ("event_mention", "f1", "Event mention F1 (micro)"),
    ("event_mention", "macro_f1", "Event mention macro-F1"),
    ("argument_role", "f1", "Argument role F1 (micro)"),
)
TENSORBOARD_METRICS: tuple[str, ...] = ("p", "r", "f1", "macro_f1")

ScoreJson = Mapping[str, Any]


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    chart: Path
    scores: Path


def check_scores(name: str, scores: ScoreJson) -> None:
    """Raise ValueError naming the model and the key path when ``scores`` lacks part of the score object."""
    blocks = [(f"{task}.{setting}", scores.get(task, {}).get(setting)) for task in TASKS for setting in SETTINGS]
    blocks += [
        (f"union.{task}.{modality}", scores.get("union", {}).get(task, {}).get(modality))
        for task in TASKS
        for modality in UNION_SETTINGS
    ]
    for path, block in blocks:
        if not isinstance(block, Mapping):
            raise ValueError(f"scores of {name!r}: missing {path} (expected the `rmpl-ds score --json` object)")
        missing = [metric for metric in METRICS if metric not in block]
        if missing:
            raise ValueError(f"scores of {name!r}: {path} lacks {', '.join(missing)}")


def _pct(value: float) -> str:
    return f"{value:.1f}"


def render_markdown(
    results: Mapping[str, ScoreJson],
    extra_md: str = "",
    *,
    preamble: str = "",
    row_notes: Mapping[str, str] | None = None,
) -> str:
    """report.md's text: Table 2 (one row per model), macro-F1, raw counts, the union variants, the gold sizes.

    ``preamble`` is shown first, as a quoted note (what the run is, e.g. synthetic data and a tiny model);
    ``row_notes`` explains a model's row (the model's name gets a mark and the note follows the table)."""
    if not results:
        raise ValueError("no results to report")
    for name, scores in results.items():
        check_scores(name, scores)
    notes = {name: note for name, note in (row_notes or {}).items() if name in results}
    marks = {name: "*" * (index + 1) for index, name in enumerate(notes)}
    lines = ["# M2E2 evaluation", ""]
    if preamble.strip():
        lines += [f"> {line}" if line else ">" for line in preamble.strip().splitlines()] + [""]
    lines += [
        "## Table 2 (micro-averaged)",
        "",
        "Micro-averaged P / R / F1 in percent (every unit counts once, whatever its event type); EM = event mention, "
        "AR = argument role; T = text-only, I = image-only, M = multimedia. Scoring rules: `rmpl-ds score --help`.",
        "",
    ]
    header = ["Model"]
    for setting in SETTINGS:
        letter = SETTING_LETTERS[setting]
        header += [f"{letter} EM {m}" for m in ("P", "R", "F1")] + [f"{letter} AR {m}" for m in ("P", "R", "F1")]
    lines += _table(
        header,
        [
            [name + (f" {marks[name]}" if name in marks else "")]
            + [
                _pct(scores[task][setting][metric])
                for setting in SETTINGS
                for task in TASKS
                for metric in ("p", "r", "f1")
            ]
            for name, scores in results.items()
        ],
    )
    if notes:
        lines += [""] + [f"{marks[name]} {name}: {note}" + "  " for name, note in notes.items()]
    lines += ["", "## Event mention macro-F1 (the mean of per-type F1; the paper's event-mention metric)", ""]
    lines += _table(
        ["Model", *(SETTING_TITLES[s] for s in SETTINGS)],
        [[name, *(_pct(scores["event_mention"][s]["macro_f1"]) for s in SETTINGS)] for name, scores in results.items()],
    )
    lines += ["", "## Raw counts (tp / pred / gold)", ""]
    lines += _table(
        ["Model", *(f"{SETTING_TITLES[s]} {t}" for s in SETTINGS for t in ("EM", "AR"))],
        [
            [name, *(_counts(scores[task][setting]) for setting in SETTINGS for task in TASKS)]
            for name, scores in results.items()
        ],
    )
    lines += [
        "",
        "## Union variants (all text events / all image events, as older work scored them)",
        "",
    ]
    union_header = ["Model"]
    for modality in UNION_SETTINGS:
        union_header += [f"{modality} EM {m}" for m in ("P", "R", "F1", "mF1")]
        union_header += [f"{modality} AR {m}" for m in ("P", "R", "F1")]
    union_rows = []
    for name, scores in results.items():
        row = [name]
        for modality in UNION_SETTINGS:
            em = scores["union"]["event_mention"][modality]
            ar = scores["union"]["argument_role"][modality]
            row += [_pct(em["p"]), _pct(em["r"]), _pct(em["f1"]), _pct(em["macro_f1"])]
            row += [_pct(ar["p"]), _pct(ar["r"]), _pct(ar["f1"])]
        union_rows.append(row)
    lines += _table(union_header, union_rows)
    gold_lines = _gold_lines(results)
    if gold_lines:
        lines += ["", "## Gold", "", *gold_lines]
    if extra_md.strip():
        lines += ["", extra_md.strip()]
    return "\n".join(lines) + "\n"


def _counts(block: ScoreJson) -> str:
    return f"{block['tp']} / {block['pred']} / {block['gold']}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _gold_lines(results: Mapping[str, ScoreJson]) -> list[str]:
    """The gold sizes once when every model was scored on the same gold, else per model."""
    counted = {name: scores.get("gold_counts") for name, scores in results.items() if scores.get("gold_counts")}
    if not counted:
        return []
    distinct = {json.dumps(counts, sort_keys=True) for counts in counted.values()}
    if len(distinct) == 1:
        return [_gold_sentence(next(iter(counted.values())))]
    return [f"- {name}: {_gold_sentence(counts)}" for name, counts in counted.items()]


def _gold_sentence(counts: Mapping[str, int]) -> str:
    return (
        f"{counts.get('text_events', 0)} text events ({counts.get('text_only_events', 0)} text-only + "
        f"{counts.get('text_multimedia_events', 0)} multimedia), {counts.get('image_events', 0)} image events "
        f"({counts.get('image_only_events', 0)} image-only + {counts.get('image_multimedia_events', 0)} multimedia), "
        f"{counts.get('coref_triples', 0)} coreference triples."
    )


def plot_f1(results: Mapping[str, ScoreJson], path: str | Path) -> Path:
    """A PNG with one panel per :data:`CHART_PANELS` entry: per setting, one bar per model, labelled with its value.

    Uses matplotlib's object API with the Agg canvas (no pyplot), so no global backend state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results to plot")
    for name, scores in results.items():
        check_scores(name, scores)
    path = Path(path)
    names = list(results)
    width = 0.8 / len(names)
    figure = Figure(figsize=(4.2 * len(CHART_PANELS), 3.8 + 0.25 * len(names)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(CHART_PANELS), sharey=True)
    for axis, (task, metric, title) in zip(axes, CHART_PANELS, strict=True):
        for number, name in enumerate(names):
            values = [results[name][task][setting][metric] for setting in SETTINGS]
            positions = [index - 0.4 + width * (number + 0.5) for index in range(len(SETTINGS))]
            bars = axis.bar(positions, values, width, label=name, color=f"C{number % 10}")
            axis.bar_label(bars, labels=[f"{value:.1f}" for value in values], fontsize=7, padding=1)
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(len(SETTINGS)), [SETTING_TITLES[s] for s in SETTINGS])
        axis.set_ylim(0, 108)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("percent")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(names), 4))
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format="png")
    return atomic.write_bytes(path, buffer.getvalue())


def write_report(
    out_dir: str | Path,
    results: Mapping[str, ScoreJson],
    extra_md: str = "",
    *,
    preamble: str = "",
    row_notes: Mapping[str, str] | None = None,
) -> ReportPaths:
    """Write ``report.md`` (:func:`render_markdown`), ``f1.png`` (:func:`plot_f1`) and ``scores.json`` (the input).

    ``results`` maps a model name to its score object. Each file is written under a temporary name and renamed, so
    a file that is there is complete.

    Raises:
        ValueError: ``results`` is empty or a score object lacks a part (the message names the model and key).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results, extra_md, preamble=preamble, row_notes=row_notes)
    chart = plot_f1(results, out / "f1.png")
    paths = ReportPaths(out / "report.md", chart, out / "scores.json")
    atomic.write_text(paths.scores, json.dumps(dict(results), indent=2) + "\n")
    atomic.write_text(paths.markdown, markdown)
    return paths


def tensorboard_scalars(scores: ScoreJson | M2E2Scores, prefix: str = "eval/m2e2") -> list[tuple[str, float]]:
    """(tag, value) pairs: ``{prefix}/{task}/{setting}/{metric}`` and ``{prefix}/union/{task}/{modality}/{metric}``
    for metric in p, r, f1, macro_f1 (percent)."""
    if isinstance(scores, M2E2Scores):
        scores = scores.to_json()
    check_scores(prefix, scores)
    pairs = [
        (f"{prefix}/{task}/{setting}/{metric}", float(scores[task][setting][metric]))
        for task in TASKS
        for setting in SETTINGS
        for metric in TENSORBOARD_METRICS
    ]
    pairs += [
        (f"{prefix}/union/{task}/{modality}/{metric}", float(scores["union"][task][modality][metric]))
        for task in TASKS
        for modality in UNION_SETTINGS
        for metric in TENSORBOARD_METRICS
    ]
    return pairs


def log_scores_to_tensorboard(
    writer_or_logdir: Any, scores: ScoreJson | M2E2Scores, step: int, prefix: str = "eval/m2e2"
) -> int:
    """Write :func:`tensorboard_scalars` at ``step``; returns how many scalars were written.

    ``writer_or_logdir`` is an object with ``add_scalar(tag, value, step)`` (a ``SummaryWriter``; it is flushed,
    not closed) or a directory, for which a ``SummaryWriter`` is opened and closed here. Call it on rank 0 only,
    like every other TensorBoard write.
    """
    pairs = tensorboard_scalars(scores, prefix)
    if isinstance(writer_or_logdir, str | Path):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(writer_or_logdir)) as writer:
            for tag, value in pairs:
                writer.add_scalar(tag, value, step)
        return len(pairs)
    for tag, value in pairs:
        writer_or_logdir.add_scalar(tag, value, step)
    if hasattr(writer_or_logdir, "flush"):
        writer_or_logdir.flush()
    return len(pairs)
