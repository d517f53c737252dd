"""Everything about a run that can be checked before anything starts, every problem listed at once.

``rmpl-ds check RECIPE --deep``, ``rmpl-ds train`` and ``rmpl-ds pipeline`` call :func:`preflight` before a
process group, a model or a run folder exists, so that a wrong path costs seconds, not a trained stage:

* the base model: a local Hugging Face directory of the recipe's family, for the stages that start from it (the
  message says how to get it: ``hf download <repo> --local-dir <model.path>``);
* the ``init_from`` export of a stage started on its own (the stage it comes from does not run first);
* every shard set the stages read: present (re-hashed and re-indexed when ``verify_shards``), or, for the pipeline,
  buildable from the recipe's ``raw`` section (its input and images exist);
* the evaluation's M2E2 annotations and images (all five files parse; every annotated image is there; a sample is
  opened), when the run evaluates;
* the output directory: writable, with room for the planned checkpoints and exports (the estimate is shown);
* on a GPU host, the memory planner's verdict for each stage.

Nothing is created or written. :func:`preflight` returns the problems as ``what: why`` lines;
:func:`check_or_raise` raises one UserError listing them all (the CLI exits 2).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rmpl_ds.config import Recipe, StageConfig
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

log = get_logger(__name__)

# The converters of `rmpl-ds shards build` (rmpl_ds.sources.SOURCES), for the hint of a missing shard set.
CONVERTERS = ("ace", "imsitu", "swig", "mnre", "m2e2", "chat", "pairs", "schema")
# How many evaluation images are opened and decoded (the rest are checked for presence).
IMAGES_OPENED = 5
GIB = 2**30


@dataclass(frozen=True)
class Scope:
    """What the run will do.

    Attributes:
        stages: the stages that will run, in order (``rmpl-ds train``: one; the pipeline and ``check``: all).
        run_dir: the run directory (exports of earlier stages are looked up there).
        world_size: ranks of the run.
        verify_shards: re-hash and re-index every shard set in full (else the manifest, index and sizes only).
        build_shards: a missing shard set may be built from the recipe's ``raw`` section first (the pipeline).
        evaluate: the run evaluates on M2E2 afterwards (the pipeline).
        gpu_memory_gib: the card's memory on a GPU host (the planner's verdict is checked), else None.
        force: start although the planner says a stage does not fit.
    """

    stages: tuple[str, ...]
    run_dir: Path
    world_size: int
    verify_shards: bool = True
    build_shards: bool = False
    evaluate: bool = False
    gpu_memory_gib: float | None = None
    force: bool = False


def preflight(recipe: Recipe, scope: Scope) -> list[str]:
    """Every problem that would stop or spoil the run, as ``what: why`` lines (empty: go). Writes nothing."""
    stages = [recipe.stage(name) for name in scope.stages]
    problems: list[str] = []
    problems += _model_problems(recipe, stages)
    problems += _init_problems(recipe, stages, scope)
    problems += _shard_problems(recipe, stages, scope)
    if scope.evaluate:
        problems += evaluation_problems(recipe)
    problems += _output_problems(recipe, stages, scope)
    if scope.gpu_memory_gib is not None:
        problems += _memory_problems(recipe, stages, scope)
    return problems


def check_or_raise(recipe: Recipe, scope: Scope) -> None:
    """:func:`preflight`, raising one UserError that lists every problem (nothing has been created)."""
    problems = preflight(recipe, scope)
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems)
        raise UserError(
            f"recipe {recipe.name}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found before "
            f"anything started (nothing was created):\n{listed}"
        )


# ------------------------------------------------------------------------------------------------ the checks


def _model_problems(recipe: Recipe, stages: Sequence[StageConfig]) -> list[str]:
    if all(stage.init_from is not None for stage in stages):
        return []
    try:
        check_model_dir(recipe.model.family, recipe.model.path)
    except UserError as error:
        return [f"model.path: {error}"]
    return []


def check_model_dir(family: str, path: str) -> None:
    """The base model is a local Hugging Face directory of ``family`` (config, tokenizer, processor load).

    Raises:
        UserError: missing (with the command that fetches the published checkpoint), or not of this family.
    """
    from rmpl_ds.backbones import get_adapter

    adapter = get_adapter(family)
    if not (Path(path) / "config.json").is_file():
        where = "does not exist" if not Path(path).exists() else "has no config.json"
        raise UserError(
            f"{path} {where}. Download the weights once (on a machine with hub access) with "
            f"`hf download {adapter.spec.hub_name} --local-dir {path}` (the hf command comes with huggingface_hub), or "
            "point the recipe at your copy with model.path=DIR"
        )
    try:
        adapter.load_processor(path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as error:  # transformers' errors for a broken or foreign directory
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a loadable Hugging Face {family} directory: {first_line}") from None


def _init_problems(recipe: Recipe, stages: Sequence[StageConfig], scope: Scope) -> list[str]:
    from rmpl_ds import handoff

    problems = []
    running = set(scope.stages)
    for stage in stages:
        if stage.init_from is None or stage.init_from in running:
            continue
        export = handoff.export_path(scope.run_dir / stage.init_from)
        try:
            handoff.verify_export(export, recipe, stage.init_from)
        except UserError as error:
            problems.append(
                f"stages.{stage.name}.init_from: {error} (run stage {stage.init_from} first, or the whole pipeline)"
            )
    return problems


def _shard_problems(recipe: Recipe, stages: Sequence[StageConfig], scope: Scope) -> list[str]:
    from rmpl_ds.chat import stream_problems
    from rmpl_ds.shards import ShardSet, read_manifest, verify_shards

    problems = []
    set_sources: dict[str, str] = {}  # source -> what its shard manifest says it holds (chat or an RMPL source)
    for source in dict.fromkeys(stream.source for stage in stages for stream in stage.mixture):
        directory = Path(recipe.sources[source])
        if not (directory / "manifest.json").is_file():
            raw = recipe.raw.get(source) if scope.build_shards else None
            if raw is None:
                converter = source if source in CONVERTERS else f"<{'|'.join(CONVERTERS)}>"
                how = f", or add a raw.{source} entry for the pipeline to build it" if scope.build_shards else ""
                problems.append(
                    f"sources.{source}: no shard set at {directory}; build it with `rmpl-ds shards build --source "
                    f"{converter} --input ... --out {directory}`{how}"
                )
                continue
            if raw.converter == "pseudo" and recipe.source_at(raw.input) in recipe.raw:
                continue  # the unlabeled pairs' set, built from its own raw entry first
            if not Path(raw.input).exists():
                problems.append(f"raw.{source}.input: {raw.input} does not exist (the {raw.converter} data to build)")
            if raw.images is not None and not _non_empty_dir(Path(raw.images)):
                problems.append(f"raw.{source}.images: {raw.images} is not a directory with images in it")
            continue
        if scope.verify_shards:
            found = verify_shards(directory)
            if found:
                shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
                problems.append(f"sources.{source}: {directory} is damaged ({shown}); rebuild it")
                continue
        else:
            try:
                ShardSet.open(directory).close()
            except UserError as error:
                problems.append(f"sources.{source}: {error}")
                continue
        set_sources[source] = read_manifest(directory)["source"]
    for stage in stages:
        problems += stream_problems(stage, set_sources)
    return problems


def evaluation_problems(recipe: Recipe) -> list[str]:
    """The M2E2 annotations parse, every annotated image is in the images folder, and a sample decodes."""
    from rmpl_ds.evaluate.infer import plan_items
    from rmpl_ds.images import load_image
    from rmpl_ds.sources.m2e2 import load_m2e2

    evaluation = recipe.evaluation
    missing = [key for key in ("m2e2", "images") if getattr(evaluation, key) is None]
    if missing:
        return [f"evaluation.{key}: not set (the M2E2 annotations and image directories)" for key in missing]
    try:
        gold = load_m2e2(evaluation.m2e2)
    except UserError as error:
        return [f"evaluation.m2e2: {error}"]
    try:
        plan = plan_items(gold, evaluation.images, evaluation.settings, evaluation.limit)
    except UserError as error:
        return [f"evaluation.images: {error}"]
    problems = []
    images = [item.image_path for item in plan.items if item.image_path is not None]
    for path in images[:IMAGES_OPENED]:
        try:
            load_image(path)
        except UserError as error:
            problems.append(f"evaluation.images: {error}")
    return problems


def _output_problems(recipe: Recipe, stages: Sequence[StageConfig], scope: Scope) -> list[str]:
    existing = scope.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return [f"output_dir: {scope.run_dir} cannot be created or written ({existing} is not a writable directory)"]
    needed = planned_bytes(recipe, stages)
    if needed is None:
        return []
    free = shutil.disk_usage(existing).free
    log.debug(
        "output %s: the planned checkpoints and exports take about %.1f GiB; %.1f GiB free",
        scope.run_dir,
        needed / GIB,
        free / GIB,
    )
    if needed > free:
        return [
            f"output_dir: {scope.run_dir} needs about {needed / GIB:.1f} GiB for the planned checkpoints and exports "
            f"(keep_last + 1 checkpoints and one export per stage), but {free / GIB:.1f} GiB are free"
        ]
    return []


def planned_bytes(recipe: Recipe, stages: Sequence[StageConfig]) -> int | None:
    """Disk the stages' checkpoints (``keep_last`` + the one being written) and exports take; None if the model's
    size cannot be known yet (its directory is missing: reported as a model problem)."""
    from rmpl_ds.plan import count_parameters, lora_parameters, recipe_backbone

    try:
        _, config = recipe_backbone(recipe)
        total = count_parameters(config).total
        model = recipe.model
        trainable = total if model.mode == "full" else lora_parameters(config, model.lora.rank, model.lora.targets)
    except UserError:
        return None
    # A LoRA checkpoint holds the trainable weights (bf16) and their fp32 master + Adam moments over all ranks; a
    # full one the whole model in bf16 plus the same optimizer states. A merged export is the model in bf16.
    weights = 2 * (trainable if model.mode != "full" else total)
    checkpoint = weights + 12 * trainable
    needed = 0
    for stage in stages:
        export = 2 * total if stage.export == "merged" or model.mode == "full" else 2 * trainable
        needed += (stage.keep_last + 1) * checkpoint + export
    return needed


def _memory_problems(recipe: Recipe, stages: Sequence[StageConfig], scope: Scope) -> list[str]:
    from rmpl_ds.plan import check_fits

    assert scope.gpu_memory_gib is not None
    problems = []
    for stage in stages:
        try:
            check_fits(recipe, scope.world_size, gpu_mem_gib=scope.gpu_memory_gib, force=scope.force, stage=stage.name)
        except UserError as error:
            problems.append(f"stages.{stage.name}: {str(error).splitlines()[0]}")
    return problems


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def gpu_memory_gib() -> float | None:
    """The first GPU's memory in GiB on a GPU host, else None (the planner's verdict is a GPU matter)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB
