"""One training stage, top to bottom: recipe -> data -> model -> DeepSpeed engine -> loop -> export.

Run under the deepspeed launcher (one process per GPU; with no GPU, DeepSpeed's CPU accelerator and gloo)::

    deepspeed --num_gpus 2 -m rmpl_ds.train launch/recipes/rmpl_qwen2vl_7b.yaml --stage stage1
    rmpl-ds train launch/recipes/rmpl_qwen2vl_7b.yaml --stage stage1 --gpus 2     # starts the launcher for you

What a stage guarantees:

* the data are the recipe's mixture, exact in every window, from the slot-stream sampler (rmpl_ds.mixing);
* a checkpoint every ``checkpoint_every`` steps and at the end, sealed only when every rank finished writing;
  ``--resume auto`` continues from the newest sealed one and logs the same losses as an uninterrupted run
  (bitwise on CPU);
* SIGTERM / SIGINT finish the current step, checkpoint and exit 0 (a second signal aborts);
* a step whose loss is NaN or inf on any rank is skipped on every rank and counted; after ``max_bad_steps``
  such steps in a row the stage checkpoints (the weights of the last good step) and exits 3;
* the inputs (the ``init_from`` export, the checkpoint to resume from, the shard sets) are checked before a
  process group or a model exists, so a bad one fails in seconds with exit 2 and the reason; ``--resume auto``
  skips a damaged newest checkpoint (with a warning naming it) for the newest intact one;
* before a model is loaded, the ranks check that they share the run directory (a filesystem every node sees)
  and that they all resume from the same checkpoint (tag and seal), else every rank exits 2;
* a checkpoint written by another number of ranks is converted once to DeepSpeed's universal format (cached
  beside it, sealed) and loaded from that: the world size may change on resume, the data continue at the
  checkpoint's slot, and dropout, drawn per micro-batch from (seed, slot), is what an uninterrupted run draws;
* a collective that waits longer than ``--collective-timeout`` for another rank raises, so a hung or vanished
  rank ends the job instead of hanging it;
* at the end, an export (merged HF directory or PEFT adapter) with a manifest the next stage verifies.

Exit codes: 0 done (or stopped by a signal / ``--stop-after`` with a checkpoint), 1 a failure (a bug, or another
rank gone or hung), 2 a bad input, 3 too many consecutive non-finite losses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rmpl_ds import checkpoint, dist, engine, handoff
from rmpl_ds.collate import model_inputs
from rmpl_ds.config import Recipe, StageConfig, batch_plan, fingerprint, fingerprinted, load_recipe
from rmpl_ds.dev_eval import BestTracker, DevSet
from rmpl_ds.ds_config import fill, recipe_ds_config, zero_stage
from rmpl_ds.errors import USER_ERROR_EXIT, UserError
from rmpl_ds.log import get_logger, quiet_libraries, setup_logging
from rmpl_ds.loss import LossPath, forward_loss
from rmpl_ds.mixing import batch_slots
from rmpl_ds.weighting import StreamWeights

log = get_logger("rmpl_ds.train")

# Batch keys the loop consumes itself (the loss is computed here, per stream); the rest are model inputs.
LOOP_KEYS = ("labels", "stream_index", "loss_weight")

FAILURE_EXIT = 1
BAD_STEPS_EXIT = 3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rmpl_ds.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    parser.add_argument("--stage", required=True, help="name of the stage to run")
    parser.add_argument("--out", default=None, help="run directory (default: the recipe's output_dir)")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint dir")
    parser.add_argument(
        "--new-phase", action="store_true", help="resume even if the data mixture or shards changed (a new phase)"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="checkpoint and exit after this optimizer step (planned preemption)",
    )
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"give up on a collective after this long (default: ${engine.COLLECTIVE_TIMEOUT_ENV} or "
        f"{engine.DEFAULT_COLLECTIVE_TIMEOUT_S:.0f})",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, unknown = parser.parse_known_args(argv)
    bad = [token for token in unknown if "=" not in token or token.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *unknown]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    quiet_libraries()
    try:
        return run(args)
    except UserError as error:
        print(f"rmpl_ds.train [rank {dist.rank()}]: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except RuntimeError as error:
        if not engine.is_collective_failure(error):
            raise
        # Another rank hung past the timeout or is gone: not this rank's bug, so no traceback.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(
            f"rmpl_ds.train [rank {dist.rank()}]: error: a collective failed ({first_line}); another rank hung "
            "or died. Resume with --resume auto from the last sealed checkpoint",
            file=sys.stderr,
        )
        return FAILURE_EXIT


@dataclass
class StageRun:
    """Where a stage writes: ``<run dir>/<stage>/{checkpoints, export, metrics.jsonl, train.log, summary.json}`` and
    ``<run dir>/tensorboard/<stage>``."""

    recipe: Recipe
    stage: StageConfig
    run_dir: Path

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage.name

    @property
    def checkpoint_root(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        """This stage's TensorBoard run: ``<run dir>/tensorboard/<stage>`` (one logdir lists every stage)."""
        return self.run_dir / "tensorboard" / self.stage.name

    @property
    def step_offset(self) -> int:
        """Where this stage's steps start on TensorBoard's axis: the steps of the recipe's earlier stages."""
        names = [stage.name for stage in self.recipe.stages]
        return sum(stage.steps for stage in self.recipe.stages[: names.index(self.stage.name)])


def run(args: argparse.Namespace) -> int:
    # ---- 1. recipe, and every input checked before a process group or a model exists (a bad one costs seconds)
    recipe = load_recipe(args.recipe, args.overrides, world_size=dist.world_size())
    stage = recipe.stage(args.stage)
    paths = StageRun(recipe, stage, Path(args.out) if args.out else recipe.out_dir())
    timeout_s = engine.collective_timeout_s(args.collective_timeout)
    ds_config = recipe_ds_config(recipe.launch)
    init_export = verify_init_export(paths)
    # DeepSpeed's files are pickles: find() re-hashes them against the seal before anything of them is loaded.
    ref = checkpoint.find(paths.checkpoint_root, args.resume)
    if ref is not None and args.stop_after is not None and args.stop_after <= ref.step:
        raise UserError(f"--stop-after {args.stop_after}: this run resumes after step {ref.step} ({ref.path})")
    saved_world = elastic_resume(ref, dist.world_size())
    from rmpl_ds.data import StageData, close_batches, open_sources

    shard_sets = open_sources(recipe, stage)
    faults = engine.Faults.from_env()

    # ---- 2. runtime
    device = engine.configure_runtime(deterministic=not torch.cuda.is_available())
    engine.init_distributed(device, timeout_s)
    world, rank = dist.world_size(), dist.rank()
    check_shared_run_dir(paths)
    agree_on_checkpoint(ref)
    universal = universal_form(ref, saved_world) if saved_world is not None else None
    plan = batch_plan(stage.global_batch, stage.micro_batch, world)
    log.info(
        "stage %s: %d steps, batch %d = %d x %d x %d ranks",
        stage.name,
        stage.steps,
        plan.global_batch,
        plan.micro_batch,
        plan.accumulation,
        world,
    )

    # ---- 3. model (the same initial weights on every rank: DeepSpeed also broadcasts rank 0's)
    engine.seed_everything(stage.seed)
    model, bundle, init_path = load_model(paths, device, zero_stage(ds_config), init_export)

    # ---- 4. data
    data = StageData.build(recipe, stage, bundle, shard_sets)
    log.info("mixture: window discrepancy %.3f over streams %s", data.stream.discrepancy, ", ".join(data.stream_names))
    dev = DevSet.build(stage, shard_sets) if stage.eval is not None else None
    if dev is not None:
        log.info("eval every %d steps on held-out %s records: %s", dev.every, dev.splits, dev.describe())

    # ---- 5. engine
    import deepspeed

    optimizer, scheduler = engine.build_optimizer(model, stage)
    config = fill(
        ds_config,
        stage,
        plan,
        bf16=recipe.model.dtype == "bf16",
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if universal is not None:
        config["checkpoint"] = {"load_universal": True}
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    # ---- 6. resume
    start_step, next_slot = 0, 0
    health = Health()
    saved: dict[str, Any] = {}
    if ref is not None:
        start_step, next_slot, health, saved = resume(ds_engine, ref, data, paths, args.new_phase, universal=universal)
    else:
        engine.seed_everything(stage.seed * 1000 + rank)  # dropout differs per rank, deterministically
    if start_step >= stage.steps:
        log.info("stage %s already finished at step %d", stage.name, start_step)
    loader = data.loader(next_slot=next_slot, micro_batch=plan.micro_batch, num_workers=recipe.launch.num_workers)
    best = BestTracker.from_state(stage.eval.metric, saved.get("eval"), start_step) if stage.eval is not None else None
    weights = StreamWeights.build(stage.loss_weighting, data.stream_names, [s.loss_weight for s in stage.mixture])
    weights = weights.restored(saved.get("loss_weighting"))

    # ---- 7. loop
    from rmpl_ds.monitor import Monitor

    monitor = Monitor(
        paths.stage_dir,
        total_steps=stage.steps,
        start_step=start_step,
        tensorboard_dir=paths.tensorboard_dir if recipe.logging.tensorboard else None,
        step_offset=paths.step_offset,
        console_every=recipe.logging.console_every,
        device_type=device.type,
    )
    stop = engine.GracefulStop()
    stream_names = data.stream_names
    step = start_step
    last_saved = start_step if ref is not None else -1
    batches = iter(loader)
    began = time.perf_counter()
    final_loss = float("nan")
    try:
        while step < stage.steps:
            lr = ds_engine.get_lr()[0]  # the lr this step applies (the schedule advances inside engine.step)
            slots = batch_slots(step - start_step, plan.global_batch, world, plan.micro_batch, rank, next_slot)
            metrics = train_step(
                ds_engine,
                batches,
                plan.accumulation,
                device,
                stream_names,
                loss_path=recipe.model.loss,
                inject_nan=faults.nan_at(step + 1),
                stop_requested=stop.requested,
                dropout_seeds=[engine.dropout_seed(stage.seed, micro_batch[0]) for micro_batch in slots],
                stream_factors=weights.factors if weights.dynamic else None,
            )
            step += 1
            health = health.after(step, skipped=metrics["skipped"])
            if weights.dynamic:  # the weights this step applied; then its losses (none if skipped) into the window
                metrics["loss_weights"] = weights.weights
                losses = {} if metrics["skipped"] else metrics["loss_by_stream"]
                if weights.observe(step, losses, metrics["stream_counts"]):
                    log.info(
                        "step %d: DWA loss weights %s",
                        step,
                        " ".join(f"{name}={value:.4f}" for name, value in weights.weights.items()),
                    )
            metrics.update(step=step, lr=lr, bad_steps=health.bad_steps, bad_steps_in_a_row=health.in_a_row)
            metrics["elapsed_s"] = time.perf_counter() - began  # since this run's loop began (steps/s between lines)
            metrics["epochs"] = data.stream.epochs_at(step * plan.global_batch)
            metrics["realized_share"] = realized_share(data.stream, step * plan.global_batch)
            metrics["peak_memory_gib"] = peak_memory_gib(device)
            if device.type == "cuda":  # what the caching allocator holds (bench/gpu/ compares it with the planner)
                metrics["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            final_loss = metrics["loss"]
            if dev is not None and best is not None and (step % dev.every == 0 or step == stage.steps):
                results = dev.evaluate(
                    ds_engine,
                    data.renderer,
                    data.collator,
                    micro_batch=plan.micro_batch,
                    device=device,
                    stream_names=stream_names,
                    loss_path=recipe.model.loss,
                )
                improved = best.record(step, results)
                metrics.update(results)
                by_task = results.get("eval_f1_by_task", {})
                f1_line = "".join(f" {task} F1 {value:.2f}" for task, value in by_task.items())
                log.info(
                    "eval step %d: loss %.4f [%s]%s in %.1f s%s",
                    step,
                    results["eval_loss"],
                    " ".join(f"{name}={value:.4f}" for name, value in sorted(results["eval_loss_by_stream"].items())),
                    f1_line,
                    results["eval_time_s"],
                    " (best so far)" if improved else "",
                )
            if (
                step % recipe.logging.log_every == 0
                or step == stage.steps
                or metrics["skipped"]
                or "eval_loss" in metrics
            ):
                monitor.log_step(metrics)
            if metrics["skipped"]:
                log.warning(
                    "step %d skipped: non-finite loss on some rank (%d in a row; the stage stops at %d)",
                    step,
                    health.in_a_row,
                    stage.max_bad_steps,
                )
            diverged = health.in_a_row >= stage.max_bad_steps
            stopping = metrics.pop("stop_requested") or step == args.stop_after
            if step % stage.checkpoint_every == 0 or step == stage.steps or stopping or diverged:
                save(ds_engine, paths, step, data, step * plan.global_batch, health, faults, best, weights)
                last_saved = step
            if diverged:
                log.error(
                    "stage %s stopped after step %d: %d steps in a row had a non-finite loss and were skipped, so "
                    "checkpoint %s holds the weights of step %d, the last good one. Lower the lr or check the data "
                    "of those steps, then resume with --resume auto (--new-phase if you change the stage)",
                    stage.name,
                    step,
                    health.in_a_row,
                    checkpoint.tag_for(step),
                    health.last_good_step,
                )
                return BAD_STEPS_EXIT
            if stopping:
                log.warning(
                    "stopped after step %d (%s); resume with --resume auto", step, stop.signal_name or "--stop-after"
                )
                return 0
    finally:
        close_batches(batches)
        monitor.close()
        stop.restore()
    if last_saved != step:
        save(ds_engine, paths, step, data, step * plan.global_batch, health, faults, best, weights)

    # ---- 8. export for the next stage (with eval.keep_best: the best evaluated step's weights)
    export_step, selected = step, None
    if best is not None and stage.eval is not None and stage.eval.keep_best and best.best is not None:
        export_step, value = best.best
        selected = {
            "step": export_step,
            "metric": f"eval {stage.eval.metric}",
            "value": value,
            "why": f"the {'highest' if best.higher_is_better else 'lowest'} eval {stage.eval.metric} of "
            f"{len(best.history)} evaluations (eval.keep_best)",
            "history": best.history,
        }
        if export_step != step:
            load_module_weights(ds_engine, paths, export_step)
    export = export_stage(ds_engine.module, bundle, paths, export_step, init_path, selected)
    if dist.is_main():
        summary = {
            "stage": stage.name,
            "steps": step,
            "final_loss": final_loss,
            "wall_time_s": round(time.perf_counter() - began, 3),
            "world_size": world,
            "bad_steps": health.bad_steps,
            "export": str(export),
            "export_step": export_step,
            "selected": selected,
            "init_from": stage.init_from,
            "init_digest": bundle.extra.get("init_digest"),
            "checkpoints": str(paths.checkpoint_root),
        }
        (paths.stage_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        log.info("stage %s done: export %s", stage.name, export)
    dist.barrier()
    return 0


def verify_init_export(paths: StageRun) -> tuple[Path, dict[str, Any]] | None:
    """The ``init_from`` stage's export and its manifest, verified (complete, unmodified, this recipe's lineage);
    None for a stage that starts from the base model. Raises UserError with the reason."""
    init_from = paths.stage.init_from
    if init_from is None:
        return None
    export = handoff.export_path(paths.run_dir / init_from)
    return export, handoff.verify_export(export, paths.recipe, init_from)


def elastic_resume(ref: checkpoint.CheckpointRef | None, world: int) -> int | None:
    """The world size ``ref`` was written by when it differs from ``world`` and its optimizer state is partitioned
    over the ranks (ZeRO shards), so that it must be loaded from DeepSpeed's universal form; else None (an ordinary
    load). Decided from the seal alone, before a process group or a model exists."""
    if ref is None:
        return None
    saved = checkpoint.saved_world_size(ref)
    if saved is None or saved == world or not checkpoint.has_zero_shards(ref):
        return None
    return saved


# How long a rank looks for the file rank 0 wrote into the run directory (a shared filesystem may show a new file to
# other nodes a moment later); a node-local directory never shows it.
SHARED_DIR_WAIT_S = 5.0
SHARED_DIR_REQUIREMENT = (
    "every rank must see the same run directory (--out) on a filesystem shared by all nodes (NFS, Lustre, a shared "
    "volume): each checkpoint holds every rank's optimizer shard and every rank resumes from it"
)


def check_shared_run_dir(paths: StageRun) -> None:
    """Refuse a run directory the ranks do not share (node-local directories, or each node given another --out),
    before anything is loaded or trained: rank 0 writes a file with a fresh token into the stage directory and
    every rank must read it back. Raises UserError on every rank. Collective."""
    if dist.world_size() == 1:
        return
    probe_dir = paths.stage_dir

    def write_probe() -> str:
        token = uuid.uuid4().hex
        try:
            probe_dir.mkdir(parents=True, exist_ok=True)
            (probe_dir / f".rmpl-shared-{token}").write_text(token, encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot write into the run directory {probe_dir}: {error.strerror or error}") from error
        return token

    token = dist.on_main(write_probe)
    probe = probe_dir / f".rmpl-shared-{token}"
    deadline = time.monotonic() + SHARED_DIR_WAIT_S
    while not _holds(probe, token) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = dist.all_gather_object((socket.gethostname(), str(probe_dir), _holds(probe, token)))
    if dist.is_main():
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} (host {host}, {where})" for rank, (host, where, sees) in enumerate(seen) if not sees]
    if blind:
        host, where, _ = seen[0]
        raise UserError(
            f"the run directory is not shared: {', '.join(blind)} cannot see the file rank 0 (host {host}) wrote "
            f"into {where}; {SHARED_DIR_REQUIREMENT}"
        )


def _holds(path: Path, token: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == token
    except (OSError, UnicodeDecodeError):
        return False


def agree_on_checkpoint(ref: checkpoint.CheckpointRef | None) -> None:
    """Every rank must resume from the same checkpoint (tag and seal digest), or start over together: a collective
    before anything is loaded. Raises UserError on every rank, listing what each one chose."""
    mine = None if ref is None else (ref.tag, checkpoint.seal_digest(ref))
    chosen = dist.all_gather_object(mine)
    if len(set(chosen)) > 1:
        listed = ", ".join(
            f"rank {rank}: {'no checkpoint' if c is None else f'{c[0]} (seal {c[1][:12]})'}"
            for rank, c in enumerate(chosen)
        )
        raise UserError(
            f"the ranks would resume from different checkpoints ({listed}); start every node with the same --resume, "
            f"and {SHARED_DIR_REQUIREMENT}"
        )


def universal_form(ref: checkpoint.CheckpointRef, saved_world: int) -> checkpoint.CheckpointRef:
    """DeepSpeed's universal form of ``ref`` (written by ``saved_world`` ranks), converted once by rank 0 and cached
    beside it, then verified by every rank against its seal. Collective; UserError on every rank if it fails."""
    log.warning(
        "world size changed (%d -> %d): resuming %s from DeepSpeed's universal checkpoint format",
        saved_world,
        dist.world_size(),
        ref.path,
    )
    dist.on_main(lambda: checkpoint.convert_to_universal(ref, workers=min(4, os.cpu_count() or 1)))
    universal = checkpoint.intact_universal(ref)
    blind = [rank for rank, intact in enumerate(dist.all_gather_object(universal is not None)) if not intact]
    if universal is None or blind:
        raise UserError(
            f"{checkpoint.universal_ref(ref).path}: the universal form rank 0 wrote is not intact on rank(s) {blind}"
        )
    return universal


def load_model(
    paths: StageRun, device: torch.device, zero: int, init_export: tuple[Path, dict[str, Any]] | None
) -> tuple[Any, Any, str]:
    """The stage's starting model: the recipe's base, or the (verified) export of the ``init_from`` stage."""
    from rmpl_ds.backbones import get_adapter

    recipe, stage = paths.recipe, paths.stage
    model_cfg = recipe.model
    path = model_cfg.path
    adapter_weights = None
    export, manifest = init_export if init_export is not None else (None, None)
    if manifest is not None:
        if manifest["kind"] == "merged":
            path = str(export)
        else:
            path, adapter_weights = manifest["base_model"], export
        log.info(
            "stage %s starts from %s (export of %s, step %d)", stage.name, export, stage.init_from, manifest["step"]
        )
    adapter = get_adapter(model_cfg.family)
    model, bundle = adapter.load(
        path,
        model_cfg.mode,
        lora=model_cfg.lora,
        train_vision_tower=model_cfg.train_vision_tower,
        train_projector=model_cfg.train_projector,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
        dtype=torch.bfloat16 if model_cfg.dtype == "bf16" else torch.float32,
        device=device,
        zero_stage=zero,
        image_size=model_cfg.image_size,
        max_image_tokens=model_cfg.max_image_tokens,
        random_init=model_cfg.init == "random",  # config refuses it for a stage with init_from
    )
    if adapter_weights is not None:
        load_adapter_weights(model, adapter_weights)
    if manifest is not None and manifest["kind"] == "merged":
        # Prove the hand-off: the base weights this stage holds are bit for bit the exported ones.
        init_digest = handoff.weights_digest(handoff.loaded_base_weights(model))
        if init_digest != manifest["weights_digest"]:
            raise UserError(f"{export}: the loaded weights differ from the export (digest mismatch)")
        log.info("stage %s holds exactly the weights of %s (digest %s)", stage.name, stage.init_from, init_digest[:12])
        bundle.extra["init_digest"] = init_digest
    return model, bundle, path


def load_adapter_weights(model: Any, adapter_dir: Path) -> None:
    """Continue training the previous stage's adapter (an ``export: adapter`` hand-off)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{adapter_dir}: adapter weights do not fit this model ({len(unexpected)} unexpected keys)")


def train_step(
    ds_engine: Any,
    batches: Any,
    accumulation: int,
    device: torch.device,
    stream_names: Sequence[str],
    *,
    loss_path: LossPath = "target_only",
    inject_nan: bool = False,
    stop_requested: bool = False,
    dropout_seeds: Sequence[int] | None = None,
    stream_factors: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One optimizer step: ``accumulation`` micro-batches through forward/backward, then the optimizer.

    A non-finite micro-batch loss on any rank makes every rank skip the whole optimizer step (see
    rmpl_ds.engine, "non-finite losses"); its micro-batches are still drawn, so the data stay where an
    uninterrupted run has them. ``loss_path`` is the recipe's ``model.loss`` (rmpl_ds.loss). ``inject_nan`` replaces
    this rank's losses by NaN (fault injection in tests). ``stop_requested`` is this rank's stop request, agreed
    with the others in the step's one reduction of its metrics. ``dropout_seeds`` (one per micro-batch) seed torch's
    RNG before each micro-batch, so its dropout masks are a function of the data it holds, not of the rank or the
    world size (:func:`rmpl_ds.engine.dropout_seed`). ``stream_factors`` (one per stream) multiply each sample's loss
    weight by its stream's factor (the DWA weights, rmpl_ds.weighting).

    The step costs one small all-reduce of its own (the metrics, the non-finite count and the stop requests, in
    one vector) and one device-to-host copy, after the optimizer step: nothing waits for the host in between.

    Returns the step's metrics, reduced over ranks: total loss (the mean of the per-sample weighted losses),
    loss per stream, throughput, the real-token fraction, ``skipped`` and ``stop_requested`` (on any rank).
    """
    began = time.perf_counter()
    n_streams = len(stream_names)
    # [loss sum per stream..., samples per stream..., weighted loss sum, samples, non-finite micro-batches,
    #  stop requests, real tokens, padded tokens]
    sums = torch.zeros(2 * n_streams + 6, dtype=torch.float64, device=device)
    real_tokens = slots = 0
    factors = None if stream_factors is None else torch.tensor(stream_factors, dtype=torch.float32)
    for micro_step in range(accumulation):
        if dropout_seeds is not None:
            torch.manual_seed(dropout_seeds[micro_step])
        batch = next(batches)
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k not in LOOP_KEYS}
        loss_weight = batch["loss_weight"] if factors is None else batch["loss_weight"] * factors[batch["stream_index"]]
        parts = forward_loss(ds_engine, inputs, batch["labels"], loss_weight, path=loss_path)
        if inject_nan:
            parts = engine.Faults.nan_loss(parts)
        ds_engine.backward(engine.poison_non_finite(parts.loss))
        ds_engine.step()
        streams = batch["stream_index"].to(device)
        sample_losses = parts.sample_losses.to(torch.float64)
        sums[:n_streams].index_add_(0, streams, sample_losses)
        sums[n_streams : 2 * n_streams].index_add_(0, streams, torch.ones_like(sample_losses))
        loss = parts.loss.detach().to(torch.float64)
        sums[2 * n_streams] += loss * len(sample_losses)
        sums[2 * n_streams + 1] += len(sample_losses)
        sums[2 * n_streams + 2] += (~torch.isfinite(loss)).to(torch.float64)
        real_tokens += batch["stats"].real_tokens
        slots += batch["stats"].slots
    sums[2 * n_streams + 3] = float(stop_requested)
    sums[2 * n_streams + 4] = real_tokens
    sums[2 * n_streams + 5] = slots
    total = engine.reduce_sums(sums)
    loss_sum, samples, non_finite, stops, real, padded = total[2 * n_streams :]
    applied = ds_engine.was_step_applied()
    if non_finite and applied:
        engine.refuse_applied_non_finite_step()
    elapsed = time.perf_counter() - began
    loss_by_stream = {
        name: total[i] / total[n_streams + i] for i, name in enumerate(stream_names) if total[n_streams + i] > 0
    }
    grad_norm = ds_engine.get_global_grad_norm()
    return {
        "loss": loss_sum / max(samples, 1.0),
        "loss_by_stream": loss_by_stream,
        "stream_counts": {name: int(total[n_streams + i]) for i, name in enumerate(stream_names)},
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": samples / elapsed,
        "tokens_per_s": real / elapsed,
        "real_token_fraction": real / max(padded, 1.0),
        "step_time_s": elapsed,
        # DeepSpeed skips a step whose reduced gradients are not finite, on every rank alike (its overflow check
        # is collective); a non-finite loss anywhere makes that rank's gradients NaN (poison_non_finite)
        "skipped": not applied,
        "stop_requested": stops > 0,
    }


def realized_share(stream: Any, next_slot: int) -> dict[str, float]:
    """Each stream's share of the samples drawn before ``next_slot`` (cumulative, exact: the sampler's counts)."""
    draws = stream.draws_before(next_slot)
    total = max(1, sum(draws))
    return {name: count / total for name, count in zip(stream.names, draws, strict=True)}


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory of this rank (GPU allocator peak; on CPU the process's peak resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# Stage settings that may change on resume without changing what is trained (the batch split is elastic).
# Settings that may change on resume without --new-phase: they do not change what is trained (eval only reads).
ELASTIC_KEYS = ("micro_batch", "checkpoint_every", "keep_last", "max_bad_steps", "eval")


def stage_fingerprint(stage: StageConfig) -> str:
    settings = {k: v for k, v in fingerprinted(stage).items() if k not in ELASTIC_KEYS}
    # Left out at its default too, as older checkpoints were hashed (exports always included it).
    if not settings["train_splits"]:  # the default: every record
        del settings["train_splits"]
    return fingerprint(settings)


@dataclass(frozen=True)
class Health:
    """Skipped (non-finite loss) steps: in total, in a row now, and the last step that was not skipped.

    Saved with every checkpoint, so a resumed run stops at the same step an uninterrupted one would.
    """

    bad_steps: int = 0
    in_a_row: int = 0
    last_good_step: int = 0

    def after(self, step: int, *, skipped: bool) -> Health:
        if skipped:
            return Health(self.bad_steps + 1, self.in_a_row + 1, self.last_good_step)
        return Health(self.bad_steps, 0, step)

    @classmethod
    def from_state(cls, state: dict[str, Any], step: int) -> Health:
        saved = state.get("health") or {}  # checkpoints written before skipping existed have none
        return cls(
            int(saved.get("bad_steps", 0)), int(saved.get("in_a_row", 0)), int(saved.get("last_good_step", step))
        )


def client_state(
    paths: StageRun,
    data: Any,
    next_slot: int,
    step: int,
    health: Health,
    best: BestTracker | None = None,
    weights: StreamWeights | None = None,
) -> dict[str, Any]:
    return {
        "rmpl": {
            "step": step,
            "stage": paths.stage.name,
            "recipe_fingerprint": stage_fingerprint(paths.stage),
            "sampler": data.stream.state(next_slot),
            "rng": engine.gather_rng(),
            "world_size": dist.world_size(),
            "health": asdict(health),
            "eval": None if best is None else best.state(),
            "loss_weighting": None if weights is None or not weights.dynamic else weights.state(),
        }
    }


def save(
    ds_engine: Any,
    paths: StageRun,
    step: int,
    data: Any,
    next_slot: int,
    health: Health,
    faults: engine.Faults,
    best: BestTracker | None = None,
    weights: StreamWeights | None = None,
) -> None:
    """Checkpoint ``step`` (every rank). With ``eval.keep_best``, the best evaluated step's checkpoint is kept out
    of the ``keep_last`` rotation."""
    state = client_state(paths, data, next_slot, step, health, best, weights)
    keep_best = paths.stage.eval is not None and paths.stage.eval.keep_best and best is not None
    protect = checkpoint.tag_for(best.best[0]) if keep_best and best.best is not None else None
    trainable_only = paths.recipe.model.mode in ("lora", "qlora")
    faults.before_checkpoint(step)
    ref = checkpoint.save(
        ds_engine,
        paths.checkpoint_root,
        step,
        state,
        keep_last=paths.stage.keep_last,
        trainable_only=trainable_only,
        after_write=lambda: faults.checkpoint_written(step),
        protect=protect,
    )
    log.info("checkpoint %s", ref.path)


def resume(
    ds_engine: Any,
    ref: checkpoint.CheckpointRef,
    data: Any,
    paths: StageRun,
    new_phase: bool,
    universal: checkpoint.CheckpointRef | None = None,
) -> tuple[int, int, Health, dict[str, Any]]:
    """Load a checkpoint that :func:`checkpoint.verify` accepted, or its verified ``universal`` form (the engine
    configured with ``checkpoint.load_universal``) when the world size changed; returns (step, next slot, health,
    the checkpoint's whole rmpl state: ``eval`` holds the evaluations so far (:meth:`BestTracker.state`),
    ``loss_weighting`` the DWA state). Refuses a changed recipe stage or data mixture."""
    trainable_only = paths.recipe.model.mode in ("lora", "qlora")
    source = universal or ref
    loaded, client = ds_engine.load_checkpoint(
        str(source.root),
        tag=source.tag,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if loaded is None or not client or "rmpl" not in client:
        raise UserError(f"{ref.path}: DeepSpeed could not load this checkpoint")
    state = client["rmpl"]
    if state["stage"] != paths.stage.name:
        raise UserError(f"{ref.path}: a checkpoint of stage {state['stage']!r}, not {paths.stage.name!r}")
    if state["recipe_fingerprint"] != stage_fingerprint(paths.stage) and not new_phase:
        raise UserError(
            f"{ref.path}: the stage's settings changed since this checkpoint (steps, lr, batch, mixture, ...); "
            "pass --new-phase to continue with the new settings, or --resume none to start over"
        )
    data.stream, next_slot = data.stream.resume(state["sampler"], new_phase=new_phase)
    if state["world_size"] == dist.world_size():
        engine.restore_rng(state["rng"][dist.rank()])
    else:
        reseed = paths.stage.seed * 1000 + dist.rank() + 7919 * state["step"]
        engine.seed_everything(reseed)
        log.warning(
            "world size changed (%d -> %d): the checkpoint holds the RNG states of %d ranks, so each rank's RNGs "
            "(torch, numpy, python) are reseeded with seed x 1000 + rank + 7919 x step (%d on rank 0). Dropout does "
            "not depend on them: it is drawn per micro-batch from the stage seed and the micro-batch's slot, as in an "
            "uninterrupted run",
            state["world_size"],
            dist.world_size(),
            state["world_size"],
            reseed - dist.rank(),
        )
    log.info("resumed from %s: step %d, next slot %d", ref.path, state["step"], next_slot)
    if dist.is_main():  # where this run continued from, one JSON line per resume (the resume tests read it)
        trace = {
            "checkpoint": str(ref.path),
            "step": int(state["step"]),
            "next_slot": int(next_slot),
            "sampler_origin": data.stream.origin,
            "torch_rng_sha256": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
            "world_size": dist.world_size(),
            "saved_world_size": int(state["world_size"]),
            "universal": None if universal is None else str(universal.path),
        }
        with (paths.stage_dir / "resume.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(trace) + "\n")
    return int(state["step"]), int(next_slot), Health.from_state(state, int(state["step"])), state


def load_module_weights(ds_engine: Any, paths: StageRun, step: int) -> None:
    """Load the model weights of the stage's sealed checkpoint of ``step`` (verified first), nothing else; every
    rank. Raises UserError when it is missing or damaged."""
    ref = checkpoint.CheckpointRef(paths.checkpoint_root, checkpoint.tag_for(step), step)
    checkpoint.verify(ref)
    trainable_only = paths.recipe.model.mode in ("lora", "qlora")
    loaded, _ = ds_engine.load_checkpoint(
        str(ref.root),
        tag=ref.tag,
        load_module_strict=not trainable_only,
        load_optimizer_states=False,
        load_lr_scheduler_states=False,
        load_module_only=True,
    )
    if loaded is None:
        raise UserError(f"{ref.path}: DeepSpeed could not load the best checkpoint's weights")
    log.info("exporting the weights of step %d (%s), the best evaluated step", step, ref.path)


def export_stage(
    model: Any, bundle: Any, paths: StageRun, step: int, init_path: str, selected: dict[str, Any] | None = None
) -> Path:
    """Rank 0 exports the stage (merged weights or the adapter) with its manifest (``selected``: why this step's
    weights, under ``eval.keep_best``); the others wait."""
    kind = paths.stage.export if paths.recipe.model.mode != "full" else "merged"
    if dist.is_main():
        adapter = bundle.adapter

        def write_model(directory: Path) -> None:
            if kind == "merged":
                adapter.merge_and_export(model, directory / "model", bundle)
            else:
                adapter.export_adapter(model, directory / "model", bundle)
            for item in (directory / "model").iterdir():
                item.rename(directory / item.name)
            (directory / "model").rmdir()

        handoff.write_export(
            paths.stage_dir,
            write_model,
            recipe=paths.recipe,
            stage_name=paths.stage.name,
            step=step,
            kind=kind,
            base_model=init_path,
            extra=None if selected is None else {"selected": selected},
        )
    dist.barrier()
    return handoff.export_path(paths.stage_dir)


if __name__ == "__main__":
    sys.exit(main())
