"""A whole recipe: shards -> every stage (deepspeed launcher) -> evaluation of each model -> report.

Resumable at stage granularity: a stage whose verified export and summary exist is not run again; an
interrupted stage resumes from its newest complete checkpoint (``--resume auto``); an evaluation whose scores
exist for the same model export is reused. ``<run dir>/summary.json`` records the stages (steps, final loss,
wall time, checkpoint and export paths) and ``"eval": {"baseline": S, "<stage>": S, ...}`` where each S is the
``rmpl-ds score --json`` object; ``report.md`` shows them in the paper's Table 2 layout with training curves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rmpl_ds import handoff, preflight
from rmpl_ds.config import Recipe, load_recipe
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

# Settings compared to show learning: the event-mention F1 of the final model against the untrained base.
LEARNING_SETTINGS = ("text_only", "image_only")


def run_pipeline(
    recipe_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    gpus: int | None = None,
    force: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the recipe end to end and return the summary (also written to ``<run dir>/summary.json``).

    ``verbose`` shows the launcher's and the libraries' output too (each stage's ``train.log`` always has it)."""
    began = time.perf_counter()
    base = load_recipe(recipe_path, overrides)
    gpus = gpus or base.launch.gpus
    recipe = load_recipe(recipe_path, overrides, world_size=gpus * base.launch.nodes)
    run_dir = Path(out) if out else recipe.out_dir()
    # Every input of every stage and of the evaluation, before anything is built, trained or created.
    scope = preflight.Scope(
        stages=tuple(stage.name for stage in recipe.stages),
        run_dir=run_dir,
        world_size=gpus * recipe.launch.nodes,
        verify_shards=False,  # each stage's `rmpl-ds train` re-hashes the sets it reads
        build_shards=True,
        evaluate=True,
        gpu_memory_gib=preflight.gpu_memory_gib(),
        force=force,
    )
    preflight.check_or_raise(recipe, scope)
    run_dir.mkdir(parents=True, exist_ok=True)

    stages = {}
    for stage in recipe.stages:
        build_missing_shards(recipe, [stage.name], run_dir=run_dir, gpus=gpus)
        stages[stage.name] = run_stage(recipe_path, overrides, recipe, stage.name, run_dir, gpus, force, verbose)

    models = {"baseline": recipe.model.path} | {name: info["export"] for name, info in stages.items()}
    scores = {name: evaluate(recipe, name, path, run_dir, gpus) for name, path in models.items()}
    log_evaluation(run_dir, recipe, scores)
    final = recipe.stages[-1].name
    margin, macro_margin = (
        {
            setting: round(
                scores[final]["event_mention"][setting][metric] - scores["baseline"]["event_mention"][setting][metric],
                2,
            )
            for setting in LEARNING_SETTINGS
        }
        for metric in ("f1", "macro_f1")
    )
    summary = {
        "recipe": str(recipe_path),
        "name": recipe.name,
        "run_dir": str(run_dir),
        "world_size": gpus * recipe.launch.nodes,
        "stages": stages,
        "eval": scores,
        "learning_margin_em_f1": margin,  # micro-F1
        "learning_margin_em_macro_f1": macro_margin,
        "wall_time_s": round(time.perf_counter() - began, 1),
    }
    report = write_pipeline_report(run_dir, recipe, summary)
    summary["report"] = str(report)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def build_missing_shards(
    recipe: Recipe, stages: Sequence[str] | None = None, *, run_dir: Path | None = None, gpus: int = 1
) -> None:
    """Reuse existing shard sets; build the missing ones the recipe's ``raw`` section describes. Only the sources
    ``stages`` (default: every stage) read are needed (evaluation reads the raw M2E2 files). A pseudo-labelled
    source is labelled by its ``label_with`` stage's export in ``run_dir``, on ``gpus`` ranks."""
    chosen = recipe.stages if stages is None else [recipe.stage(name) for name in stages]
    for name in dict.fromkeys(stream.source for stage in chosen for stream in stage.mixture):
        build_source(recipe, name, run_dir=run_dir, gpus=gpus)


def build_source(recipe: Recipe, name: str, *, run_dir: Path | None = None, gpus: int = 1) -> None:
    """Build source ``name``'s shard set from its ``raw`` entry unless it exists (see :func:`build_missing_shards`)."""
    from rmpl_ds.commands.shards import build

    shard_dir = recipe.sources[name]
    raw = recipe.raw.get(name)
    if (Path(shard_dir) / "manifest.json").is_file() and not _stale_pseudo_labels(recipe, name, run_dir):
        log.info("shards %s: reusing %s", name, shard_dir)
        return
    if raw is None:
        raise UserError(
            f"sources.{name}: no shards at {shard_dir} and no raw.{name} entry to build them from; "
            f"run `rmpl-ds shards build --source ... --out {shard_dir}`"
        )
    if raw.converter == "pseudo":
        pseudo_label_source(recipe, name, run_dir=run_dir or recipe.out_dir(), gpus=gpus)
        return
    log.info("shards %s: building %s from %s", name, shard_dir, raw.input)
    code = build(
        raw.converter,
        Path(raw.input),
        out_dir=Path(shard_dir),
        images_dir=Path(raw.images) if raw.images else None,
        shard_size=raw.shard_size,
    )
    if code != 0:
        raise UserError(f"sources.{name}: no record of {raw.input} could be converted (see {shard_dir}/manifest.json)")


def _stale_pseudo_labels(recipe: Recipe, name: str, run_dir: Path | None) -> bool:
    """Whether source ``name`` is a pseudo-labelled set that another export than its ``label_with`` stage's current
    one labelled (the stage was trained again): such a set is labelled again."""
    from rmpl_ds.pseudo import export_digest
    from rmpl_ds.shards import read_manifest

    raw = recipe.raw.get(name)
    if raw is None or raw.converter != "pseudo":
        return False
    labelled_by = (read_manifest(Path(recipe.sources[name])).get("model") or {}).get("export_manifest_sha256")
    current = export_digest(handoff.export_path((run_dir or recipe.out_dir()) / str(raw.label_with)))
    if labelled_by == current:
        return False
    log.warning("shards %s: labelled by another export than stage %s's current one; labelling again", name,
                raw.label_with)  # fmt: skip
    return True


def pseudo_label_source(recipe: Recipe, name: str, *, run_dir: Path, gpus: int) -> None:
    """Build pseudo-labelled source ``name``: its unlabeled pairs (built first if another source's ``raw`` entry
    makes them) labelled by the export of its ``label_with`` stage (`rmpl-ds pseudo-label`)."""
    raw = recipe.raw[name]
    pairs = Path(raw.input)
    if not (pairs / "manifest.json").is_file():
        maker = recipe.source_at(pairs)
        if maker not in recipe.raw:
            raise UserError(f"raw.{name}.input: no shard set of unlabeled pairs at {pairs}, and no source builds it")
        build_source(recipe, maker, run_dir=run_dir, gpus=gpus)
    export = handoff.export_path(run_dir / str(raw.label_with))
    handoff.verify_export(export, recipe, str(raw.label_with))
    command = [
        sys.executable,
        "-m",
        "rmpl_ds",
        "pseudo-label",
        "--model",
        str(export),
        "--pairs",
        str(pairs),
        "--out",
        recipe.sources[name],
        "--threshold",
        str(raw.threshold),
        "--gpus",
        str(gpus),
        "--decisions",
        str(run_dir / f"pseudo-label-{name}.jsonl"),  # one line per pair: the answers, confidences and decision
    ]
    log.info("shards %s: pseudo-labelling %s with the export of stage %s", name, pairs, raw.label_with)
    code = subprocess.call(command, env=os.environ.copy())
    if code != 0:
        raise UserError(f"sources.{name}: pseudo-labelling {pairs} with {export} failed (exit code {code})")


def run_stage(
    recipe_path: str | Path,
    overrides: Sequence[str],
    recipe: Recipe,
    name: str,
    run_dir: Path,
    gpus: int,
    force: bool,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run one stage under the launcher unless its export is complete; returns its summary."""
    stage_dir = run_dir / name
    summary_path = stage_dir / "summary.json"
    if summary_path.is_file():
        try:
            handoff.verify_export(handoff.export_path(stage_dir), recipe, name)
        except UserError as error:
            log.warning("stage %s: %s; running it again", name, error)
        else:
            log.info("stage %s: finished earlier, reusing %s", name, stage_dir)
            return json.loads(summary_path.read_text(encoding="utf-8"))
    command = [
        sys.executable,
        "-m",
        "rmpl_ds",
        "train",
        str(recipe_path),
        "--stage",
        name,
        "--out",
        str(run_dir),
        "--gpus",
        str(gpus),
        "--resume",
        "auto",
        *(["--force"] if force else []),
        *(["--verbose"] if verbose else []),
        *overrides,
    ]
    log.info("stage %s: training (log: %s)", name, stage_dir / "train.log")
    log.debug("stage %s: %s", name, " ".join(command))
    code = subprocess.call(command, env=os.environ.copy())
    if code != 0 or not summary_path.is_file():
        raise UserError(
            f"stage {name} failed (exit code {code}); fix the cause and run the pipeline again: finished stages "
            "are kept and this one resumes from its last checkpoint"
        )
    return json.loads(summary_path.read_text(encoding="utf-8"))


def evaluate(recipe: Recipe, name: str, model_dir: str, run_dir: Path, gpus: int) -> dict[str, Any]:
    """M2E2 scores of one model, reused when they exist for the same weights."""
    from rmpl_ds.evaluate.infer import evaluate_model

    evaluation = recipe.evaluation
    if evaluation.m2e2 is None or evaluation.images is None:
        raise UserError("evaluation.m2e2 and evaluation.images must name the M2E2 annotations and image directories")
    out_dir = run_dir / "eval" / name
    stamp = {
        **_model_stamp(Path(model_dir)),
        "box_format": recipe.tasks.box_format,
        "schema_guided": recipe.tasks.schema_guided,
    }
    scores_path, stamp_path = out_dir / "scores.json", out_dir / "model.json"
    if scores_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        log.info("eval %s: reusing %s", name, scores_path)
        return json.loads(scores_path.read_text(encoding="utf-8"))
    log.info("eval %s: %s", name, model_dir)
    scores = evaluate_model(
        model_dir,
        evaluation.m2e2,
        evaluation.images,
        out_dir,
        settings=evaluation.settings,
        batch_size=evaluation.batch_size,
        max_new_tokens=evaluation.max_new_tokens,
        gpus=1 if gpus < 1 else gpus,
        name=name,
        limit=evaluation.limit,
        box_format=recipe.tasks.box_format,
        schema_guided=recipe.tasks.schema_guided,
    )
    stamp_path.write_text(json.dumps(stamp), encoding="utf-8")
    return scores


def log_evaluation(run_dir: Path, recipe: Recipe, scores: dict[str, Any]) -> None:
    """Each model's scores as TensorBoard scalars in the ``eval`` run, at the global step where it was made (the
    base model at 0, a stage's export at the end of the stage on the training runs' axis)."""
    from rmpl_ds.evaluate.report import log_scores_to_tensorboard

    steps, done = {"baseline": 0}, 0
    for stage in recipe.stages:
        done += stage.steps
        steps[stage.name] = done
    for name, score in scores.items():
        log_scores_to_tensorboard(run_dir / "tensorboard" / "eval", score, steps[name], prefix="eval/m2e2")


def _model_stamp(model_dir: Path) -> dict[str, Any]:
    """What identifies a model directory's weights: the export manifest's digest, or the weight files' sizes."""
    manifest = model_dir / handoff.MANIFEST
    if manifest.is_file():
        return {"export": json.loads(manifest.read_text(encoding="utf-8")).get("files")}
    return {"files": {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.safetensors"))}}


def write_pipeline_report(run_dir: Path, recipe: Recipe, summary: dict[str, Any]) -> Path:
    """report.md: Table 2 for every evaluated model, the learning margin, training curves and run facts."""
    from rmpl_ds.evaluate.curves import plot_training_curves
    from rmpl_ds.evaluate.report import write_report

    curves = plot_training_curves(run_dir, recipe)
    final = recipe.stages[-1].name
    margins = {"micro-F1": summary["learning_margin_em_f1"], "macro-F1": summary["learning_margin_em_macro_f1"]}
    lines = [
        "## Learning",
        "",
        f"Event mention, the final model ({final}) minus the untrained base model, in points: "
        + "; ".join(
            f"{metric} " + ", ".join(f"{setting} {value:+.2f}" for setting, value in margin.items())
            for metric, margin in margins.items()
        )
        + ".",
        "",
        *held_out_lines(run_dir, recipe),
        "## Training curves",
        "",
        *[f"![{path.stem}]({path.relative_to(run_dir).as_posix()})" for path in curves],
        "",
        "## Run",
        "",
        "| stage | steps | final loss | wall time (s) | export |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {name} | {info['steps']} | {info['final_loss']:.4f} | {info['wall_time_s']:.1f} | {info['export']} |"
            for name, info in summary["stages"].items()
        ],
        "",
        f"Recipe `{summary['recipe']}` ({recipe.model.family}, {recipe.model.mode}), world size "
        f"{summary['world_size']}, seeds {', '.join(str(s.seed) for s in recipe.stages)}.",
    ]
    paths = write_report(
        run_dir,
        summary["eval"],
        extra_md="\n".join(lines),
        preamble=recipe.description or "",
        row_notes=row_notes(recipe),
    )
    return paths.markdown


def held_out_lines(run_dir: Path, recipe: Recipe) -> list[str]:
    """report.md's "Held-out evaluation during training": per stage with an ``eval`` section, each evaluation's
    loss and (with ``generate``) F1 per task, and the step the stage exported (rmpl_ds.dev_eval)."""
    from rmpl_ds.evaluate.curves import read_metrics

    lines: list[str] = []
    for stage in recipe.stages:
        evaluated = [m for m in read_metrics(run_dir / stage.name / "metrics.jsonl") if "eval_loss" in m]
        if stage.eval is None or not evaluated:
            continue
        tasks_seen = sorted({task for m in evaluated for task in m.get("eval_f1_by_task", {})})
        header = ["step", "held-out loss", *(f"{task} F1" for task in tasks_seen)]
        rows = [
            [str(m["step"]), f"{m['eval_loss']:.4f}", *(f"{m['eval_f1_by_task'][task]:.2f}" for task in tasks_seen)]
            for m in evaluated
        ]
        summary_path = run_dir / stage.name / "summary.json"
        selected = (
            json.loads(summary_path.read_text(encoding="utf-8")).get("selected") if summary_path.is_file() else None
        )
        lines += [
            f"### {stage.name}: held-out evaluation during training",
            "",
            f"{evaluated[0].get('eval_items', 0)} held-out records ({'/'.join(stage.eval.splits)}) of "
            f"{', '.join(evaluated[0]['eval_loss_by_stream'])}, every {stage.eval.every} steps"
            + (
                f"; greedy answers scored strictly (EM types; AR arguments, boxes at IoU >= {stage.eval.iou_threshold})"
                if stage.eval.generate
                else ""
            )
            + ".",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---:|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows],
            "",
        ]
        if selected:
            lines += [f"Exported: the weights of step {selected['step']}, {selected['why']}.", ""]
    return (["## Held-out evaluation during training", "", *lines]) if lines else []


# The tasks the evaluation asks for; a model never trained on them answers them by chance, if at all.
EVALUATED_TASKS = frozenset({"EM", "AR"})


def row_notes(recipe: Recipe) -> dict[str, str]:
    """Why a row of Table 2 may read 0: the base model is zero-shot; a stage whose lineage never trained the EM/AR
    prompts the evaluation asks (Stage I's unified tasks) is expected near 0 too."""
    notes = {"baseline": f"the base model ({recipe.model.path}) before any training: zero-shot"}
    for stage in recipe.stages:
        trained = {stream.task for name in handoff.lineage(recipe, stage.name) for stream in recipe.stage(name).mixture}
        if not trained & EVALUATED_TASKS:
            notes[stage.name] = (
                f"trained on {', '.join(sorted(trained))} only, never on the EM/AR prompts this evaluation asks "
                "(Stage II trains them), so scores near 0 are expected"
            )
    return notes
