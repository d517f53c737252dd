"""Benchmark: optimizer steps/s of our training loop versus a bare DeepSpeed loop (goal: ≥ 0.95×).

Same tiny model, same batches, same engine: the tiny Qwen2-VL loaded by the stage runner's own
``rmpl_ds.train.load_model`` (the demo's full fine-tune with vision tower, projector and gradient checkpointing, or
``--mode lora``), one ``deepspeed.initialize`` with the recipe's DeepSpeed config (the package's ``zero2``) filled by
``ds_config.fill`` as ``rmpl_ds.train`` fills it (ZeRO-2, bf16, reduce bucket capped at the trainable parameters)
and the engine's own AdamW + schedule, and pre-collated micro-batches of the demo's Stage I held in memory (data
loading excluded), run under the real ``deepspeed`` launcher with 1 or 2 CPU ranks on gloo. Per rank: micro-batch 8,
accumulation 1, as in the demo's 2-rank Stage I. Four loops take turns on that engine:

* ``bare``: ``loss = engine(**inputs).loss; engine.backward(loss); engine.step()`` (the model's own loss, on the
  logits of every position);
* ``train_step_full``: :func:`rmpl_ds.train.train_step` with ``loss_path="full_logits"``: the same logits as bare,
  our per-stream weighted loss on them, the non-finite poisoning, per-sample bookkeeping and the step's one
  all-reduce (metrics, non-finite count, stop request), grad norm and throughput metrics. Against bare, this is the
  loop's overhead;
* ``train_step``: the same with the recipes' default ``target_only`` loss (rmpl_ds.loss: the LM head projects only
  the target positions): what a training run executes;
* ``loop``: the body of ``rmpl_ds.train.run``'s loop without checkpoints: ``train_step`` plus the lr, health,
  epochs, realized-share and peak-memory metrics and ``Monitor.log_step`` (metrics.jsonl + TensorBoard, every step
  as in the demo).

After warmup steps of each, the loops alternate in blocks of steps (the order rotates every round), so contention
on this shared 2-CPU machine hits all of them alike. Rank 0 records per block and step its wall time, user and
system CPU time (its process, all threads) and minor page faults; steps/s is 1 / the median wall time, and each
ratio to ``bare`` is taken per round (paired blocks) and summarized by its median and quartiles over rounds. One
torch thread per rank (``--threads``), so that the CPU time is not inflated by threads spinning on a busy machine.
A cProfile of a few steps of ``bare`` and ``train_step_full`` breaks a step down into its parts, and the one
computation those two do differently, the loss, is timed alone on the same logits (ours versus the model's own).

Runs (``--runs``): 1 rank and 2 ranks as training sets them up (``rmpl_ds.engine.configure_cpu_rank``: one share
of the cores per rank, and glibc's allocator told to keep 1 GiB of freed memory instead of returning each step's
large temporaries to the kernel and faulting them in again); ``1+glibc``: 1 rank with glibc's allocator left at
its defaults, to show what that setting buys.

No GPU is lent to this task: CPU only. On a GPU the step's one ``.tolist()`` synchronizes the device once per
optimizer step, which this CPU run cannot show.

Usage: python bench/bench_engine.py [--quick] [--runs 1 1+glibc 2] [--mode full|lora] [--rounds 10] [--block 1]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import itertools
import json
import os
import pstats
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data import MICRO, DemoSet, build_demo, demo_recipe, machine, machine_line, revision
from benchlib import write_results

LOOPS = ("bare", "train_step_full", "train_step", "loop")
HELD_BATCHES = 6  # micro-batches per rank held in memory and cycled
WARMUP_STEPS = 2
PROFILE_STEPS = 3


# -- the worker (one per rank, under the deepspeed launcher) -------------------------------------------------------

# Per-step counters of this rank's process: wall clock, user and system CPU seconds (all threads), minor page faults.
COUNTERS = ("wall", "user", "sys", "page_faults")


def counters() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.perf_counter(), "user": usage.ru_utime, "sys": usage.ru_stime, "page_faults": usage.ru_minflt}


def bare_step(ds_engine: Any, batches: Any, accumulation: int, device: Any) -> None:
    from rmpl_ds.collate import model_inputs

    for _ in range(accumulation):
        batch = next(batches)
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k not in ("stream_index", "loss_weight")}
        loss = ds_engine(**inputs).loss
        ds_engine.backward(loss)
        ds_engine.step()


class LoopBody:
    """``rmpl_ds.train.run``'s per-step work, checkpointing left out (it runs every ``checkpoint_every`` steps)."""

    def __init__(self, ds_engine: Any, data: Any, plan: Any, device: Any, out_dir: Path) -> None:
        from rmpl_ds import engine
        from rmpl_ds.monitor import Monitor
        from rmpl_ds.train import Health

        self.ds_engine, self.data, self.plan, self.device = ds_engine, data, plan, device
        self.monitor = Monitor(
            out_dir,
            total_steps=10**6,
            start_step=0,
            tensorboard_dir=out_dir / "tensorboard",
            console_every=10**6,
            device_type=device.type,
        )
        self.stop = engine.GracefulStop()
        self.step = 0
        self.health = Health()
        self.began = time.perf_counter()

    def __call__(self, batches: Any) -> None:
        from rmpl_ds.train import peak_memory_gib, realized_share, train_step

        lr = self.ds_engine.get_lr()[0]
        metrics = train_step(
            self.ds_engine,
            batches,
            self.plan.accumulation,
            self.device,
            self.data.stream_names,
            stop_requested=self.stop.requested,
        )
        self.step += 1
        self.health = self.health.after(self.step, skipped=metrics["skipped"])
        metrics.update(step=self.step, lr=lr, bad_steps=self.health.bad_steps, bad_steps_in_a_row=self.health.in_a_row)
        metrics["elapsed_s"] = time.perf_counter() - self.began
        metrics["epochs"] = self.data.stream.epochs_at(self.step * self.plan.global_batch)
        metrics["realized_share"] = realized_share(self.data.stream, self.step * self.plan.global_batch)
        metrics["peak_memory_gib"] = peak_memory_gib(self.device)
        metrics.pop("stop_requested")
        self.monitor.log_step(metrics)

    def close(self) -> None:
        self.monitor.close()
        self.stop.restore()


# Where a step's time goes: (label, file suffix or "~" for built-ins, function name); cumulative time per step.
BREAKDOWN = (
    ("DeepSpeed forward", "deepspeed/runtime/engine.py", "forward"),
    ("  HF loss inside the forward (ForCausalLMLoss)", "transformers/loss/loss_utils.py", "ForCausalLMLoss"),
    ("DeepSpeed backward", "deepspeed/runtime/engine.py", "backward"),
    ("DeepSpeed step", "deepspeed/runtime/engine.py", "step"),
    ("rmpl stream_loss (per-sample weighted loss)", "rmpl_ds/loss.py", "stream_loss"),
    ("rmpl poison_non_finite", "rmpl_ds/engine.py", "poison_non_finite"),
    ("rmpl reduce_sums (the step's one all-reduce)", "rmpl_ds/engine.py", "reduce_sums"),
    ("engine.get_global_grad_norm", "deepspeed/runtime/engine.py", "get_global_grad_norm"),
    ("  torch.empty (mostly ZeRO-2 bucket buffers, page faults)", "~", "<built-in method torch.empty>"),
    ("Tensor.tolist", "~", "<method 'tolist' of 'torch._C.TensorBase' objects>"),
    ("Tensor.item", "~", "<method 'item' of 'torch._C.TensorBase' objects>"),
)


def profile_steps(run: Any, steps: int) -> dict[str, Any]:
    """``steps`` calls of ``run`` under cProfile: seconds per step, the BREAKDOWN rows and the top functions by own
    time (all per step)."""
    profiler = cProfile.Profile()
    profiler.enable()
    began = time.perf_counter()
    for _ in range(steps):
        run()
    elapsed = time.perf_counter() - began
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats
    breakdown = {}
    for label, suffix, function in BREAKDOWN:
        breakdown[label] = sum(
            cumulative / steps
            for (filename, _, name), (_, _, _, cumulative, _) in stats.items()
            if name == function and (filename == suffix if suffix == "~" else filename.endswith(suffix))
        )
    top = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.items():
        where = filename.split("site-packages/")[-1].replace(str(Path(__file__).resolve().parents[1]) + "/", "")
        top.append(
            {
                "function": f"{where}:{line}({name})",
                "calls": calls / steps,
                "own_s": own / steps,
                "cum_s": cumulative / steps,
            }
        )
    top.sort(key=lambda row: -row["own_s"])
    return {"seconds_per_step": elapsed / steps, "breakdown": breakdown, "top": top[:25]}


def loss_parts(ds_engine: Any, batch: dict[str, Any], device: Any, repeats: int = 30) -> dict[str, Any]:
    """The one computation bare and train_step (full logits) do differently, alone: the loss on the same logits
    (forward + backward), ours (``rmpl_ds.loss.stream_loss``) versus the model's own (transformers'
    ``ForCausalLMLoss``), alternated; median CPU seconds and page faults per call."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from rmpl_ds.collate import model_inputs
    from rmpl_ds.loss import stream_loss
    from rmpl_ds.train import LOOP_KEYS

    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k not in LOOP_KEYS}
        logits = ds_engine(**inputs, use_cache=False).logits.detach()
    labels, weights, vocab = batch["labels"], batch["loss_weight"], logits.size(-1)
    variants = {
        "stream_loss": lambda leaf: stream_loss(leaf, labels, weights).loss,
        "ForCausalLMLoss": lambda leaf: ForCausalLMLoss(leaf, labels, vocab),
    }
    samples: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "page_faults": []} for name in variants}
    for repeat in range(repeats + 1):
        for name, loss_of in variants.items():
            before = counters()
            leaf = logits.clone().requires_grad_(True)
            loss_of(leaf).backward()
            after = counters()
            if repeat:  # the first round warms up
                samples[name]["cpu"].append(after["user"] + after["sys"] - before["user"] - before["sys"])
                samples[name]["page_faults"].append(after["page_faults"] - before["page_faults"])
    return {
        "logits_shape": list(logits.shape),
        "logits_dtype": str(logits.dtype),
        **{name: {key: statistics.median(values) for key, values in data.items()} for name, data in samples.items()},
    }


def worker(args: argparse.Namespace) -> int:
    import deepspeed
    import torch

    from rmpl_ds import dist, engine
    from rmpl_ds.config import batch_plan
    from rmpl_ds.data import StageData
    from rmpl_ds.ds_config import fill, recipe_ds_config, zero_stage
    from rmpl_ds.train import StageRun, load_model, train_step

    described = json.loads(args.demo)
    demo = DemoSet(
        root=Path(described["root"]),
        shards={name: Path(path) for name, path in described["shards"].items()},
        model=Path(described["model"]),
        size=described["size"],
        shard_size=described["shard_size"],
    )
    if args.allocator == "glibc":  # leave glibc's allocator at its defaults (the threads are set below)
        engine.configure_cpu_rank = lambda environ=os.environ: {}
    device = engine.configure_runtime(deterministic=not torch.cuda.is_available())
    engine.init_distributed(device)
    torch.set_num_threads(args.threads)
    world, rank = dist.world_size(), dist.rank()
    overrides = [
        f"model.mode={args.mode}",
        f"stages.stage1.global_batch={MICRO * world}",
        f"stages.stage1.micro_batch={MICRO}",
    ]
    recipe = demo_recipe(demo, overrides, world_size=world)
    stage = recipe.stage("stage1")
    plan = batch_plan(stage.global_batch, stage.micro_batch, world)
    ds_config = recipe_ds_config(recipe.launch)
    engine.seed_everything(stage.seed)
    run_dir = Path(args.scratch) / f"run-{world}"
    model, bundle, _ = load_model(StageRun(recipe, stage, run_dir), device, zero_stage(ds_config), None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    data = StageData.build(recipe, stage, bundle)
    loader = iter(data.loader(next_slot=0, micro_batch=plan.micro_batch, num_workers=0, world=world, rank=rank))
    held = [next(loader) for _ in range(HELD_BATCHES)]
    tokens = sum(int(batch["attention_mask"].numel()) for batch in held) / len(held)
    optimizer, scheduler = engine.build_optimizer(model, stage)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=fill(ds_config, stage, plan, bf16=recipe.model.dtype == "bf16", trainable_params=trainable),
    )
    engine.seed_everything(stage.seed * 1000 + rank)
    batches = itertools.cycle(held)
    body = LoopBody(ds_engine, data, plan, device, run_dir / "stage1")
    loops = {
        "bare": lambda: bare_step(ds_engine, batches, plan.accumulation, device),
        "train_step_full": lambda: train_step(
            ds_engine, batches, plan.accumulation, device, data.stream_names, loss_path="full_logits"
        ),
        "train_step": lambda: train_step(
            ds_engine, batches, plan.accumulation, device, data.stream_names, loss_path=recipe.model.loss
        ),
        "loop": lambda: body(batches),
    }
    for name in LOOPS:
        for _ in range(WARMUP_STEPS):
            loops[name]()
    timings: dict[str, dict[str, list[float]]] = {name: {key: [] for key in COUNTERS} for name in LOOPS}
    for round_number in range(args.rounds):
        order = LOOPS[round_number % len(LOOPS) :] + LOOPS[: round_number % len(LOOPS)]
        for name in order:
            dist.barrier()
            before = counters()
            for _ in range(args.block):
                loops[name]()
            after = counters()
            for key in COUNTERS:
                timings[name][key].append((after[key] - before[key]) / args.block)
    profiles = {}
    for name in ("bare", "train_step_full"):
        dist.barrier()
        profiles[name] = profile_steps(loops[name], PROFILE_STEPS)
    body.close()
    losses = loss_parts(ds_engine, held[0], device) if dist.is_main() else {}
    if dist.is_main():
        result = {
            "world_size": world,
            "mode": args.mode,
            "threads_per_rank": args.threads,
            "accumulation": plan.accumulation,
            "micro_batch": plan.micro_batch,
            "global_batch": plan.global_batch,
            "parameters": total,
            "trainable_parameters": trainable,
            "mean_padded_tokens_per_micro_batch": tokens,
            "rounds": args.rounds,
            "block": args.block,
            "allocator": args.allocator,
            "loss_path": recipe.model.loss,
            "timings": timings,
            "profiles": profiles,
            "loss_parts": losses,
        }
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    dist.barrier()
    return 0


# -- the driver ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(demo: DemoSet, scratch: Path, ranks: int, allocator: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the worker under ``deepspeed --num_gpus ranks`` with the ``allocator`` settings (``rmpl``: the package's,
    ``glibc``: glibc's defaults) and return rank 0's result."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    tag = f"{ranks}-{allocator}"
    result = scratch / f"result-{tag}.json"
    log = scratch / f"launch-{tag}.log"
    env = dict(os.environ)
    env.pop("MALLOC_TOP_PAD_", None)  # a user's setting would override the package's (configure_cpu_rank)
    demo_json = json.dumps(
        {
            "root": str(demo.root),
            "shards": {name: str(path) for name, path in demo.shards.items()},
            "model": str(demo.model),
            "size": demo.size,
            "shard_size": demo.shard_size,
        }
    )
    command = [
        launcher or "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--demo",
        demo_json,
        "--scratch",
        str(scratch),
        "--result",
        str(result),
        "--mode",
        args.mode,
        "--rounds",
        str(args.rounds),
        "--block",
        str(args.block),
        "--threads",
        str(args.threads),
        "--allocator",
        allocator,
    ]
    began = time.perf_counter()
    with log.open("w") as output:
        code = subprocess.run(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1], env=env
        )
    if code.returncode != 0 or not result.is_file():
        raise RuntimeError(f"the {ranks}-rank run failed (exit {code.returncode}):\n{log.read_text()[-4000:]}")
    outcome = json.loads(result.read_text())
    outcome["launch_seconds"] = time.perf_counter() - began
    return outcome


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Medians per loop (per optimizer step) and the ratios to ``bare``."""
    summary: dict[str, Any] = {}
    for name in LOOPS:
        timing = {key: statistics.median(values) for key, values in result["timings"][name].items()}
        summary[name] = {
            "steps_per_s": 1 / timing["wall"],
            "cpu_s_per_step": statistics.median(
                user + system
                for user, system in zip(result["timings"][name]["user"], result["timings"][name]["sys"], strict=True)
            ),
            "user_s_per_step": timing["user"],
            "sys_s_per_step": timing["sys"],
            "page_faults_per_step": timing["page_faults"],
        }
    # Ratios per round (each loop's block of that round ran within seconds of the others, under the same contention),
    # then the median over rounds: a paired estimate, steadier than a ratio of medians on a shared machine.
    timings = result["timings"]
    cpu = {
        name: [user + system for user, system in zip(timings[name]["user"], timings[name]["sys"], strict=True)]
        for name in LOOPS
    }
    for name in LOOPS[1:]:
        summary[f"{name}_vs_bare"] = {
            "steps_per_s": paired(timings["bare"]["wall"], timings[name]["wall"]),
            "cpu_steps_per_s": paired(cpu["bare"], cpu[name]),
            "user_steps_per_s": paired(timings["bare"]["user"], timings[name]["user"]),
        }
    return summary


def paired(bare: list[float], ours: list[float]) -> dict[str, float]:
    """Bare's cost / ours (= our steps/s relative to bare's) per round: the median and the quartiles over rounds."""
    ratios = [b / o for b, o in zip(bare, ours, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": low, "q3": high, "rounds": ratios}


def spread(ratio: dict[str, float]) -> str:
    return f"{ratio['median']:.3f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]"


def verdict(ratio: dict[str, float], goal: float = 0.95) -> str:
    if ratio["q1"] >= goal:
        return f"meets the {goal} goal"
    if ratio["q3"] < goal:
        return f"below the {goal} goal"
    return f"not distinguishable from the {goal} goal at this noise"


def run_label(run: dict[str, Any]) -> str:
    allocator = "glibc's allocator defaults" if run["allocator"] == "glibc" else "as training sets it up"
    return f"{run['world_size']} rank{'s' if run['world_size'] > 1 else ''}, {allocator}"


def findings(report: dict[str, Any]) -> list[str]:
    """What the numbers say, computed from them."""
    lines = []
    for run in report["runs"]:
        summary = run["summary"]
        bare, full = summary["bare"], summary["train_step_full"]
        overhead, lean = summary["train_step_full_vs_bare"], summary["train_step_vs_bare"]
        lines.append(
            f"{run_label(run)}: the loop's overhead (train_step on the same full logits as bare): CPU ratio "
            f"{spread(overhead['cpu_steps_per_s'])} {verdict(overhead['cpu_steps_per_s'])}; wall ratio "
            f"{spread(overhead['steps_per_s'])} {verdict(overhead['steps_per_s'])}."
        )
        lines.append(
            f"{run_label(run)}: train_step (full logits) costs "
            f"{full['cpu_s_per_step'] - bare['cpu_s_per_step']:+.3f} s of CPU per step over bare "
            f"({full['user_s_per_step'] - bare['user_s_per_step']:+.3f} s user, "
            f"{full['sys_s_per_step'] - bare['sys_s_per_step']:+.3f} s system; "
            f"{full['page_faults_per_step'] - bare['page_faults_per_step']:+.0f} page faults); system time is "
            f"{bare['sys_s_per_step'] / bare['cpu_s_per_step']:.0%} of bare's CPU."
        )
        lines.append(
            f"{run_label(run)}: what a training run executes (train_step, {run['loss_path']} loss): "
            f"{spread(lean['steps_per_s'])}x bare's steps/s (wall), {spread(lean['cpu_steps_per_s'])} (CPU); the "
            f"whole loop body {summary['loop_vs_bare']['steps_per_s']['median']:.3f}x (wall)."
        )
        losses = run["loss_parts"]
        extra_loss = losses["stream_loss"]["cpu"] - losses["ForCausalLMLoss"]["cpu"]
        share = extra_loss / bare["cpu_s_per_step"]
        lines.append(
            f"{run_label(run)}: the loss alone (forward + backward on the same logits) takes "
            f"{1000 * losses['stream_loss']['cpu']:.1f} ms ours versus {1000 * losses['ForCausalLMLoss']['cpu']:.1f} "
            f"ms the model's own ({losses['stream_loss']['page_faults']:.0f} versus "
            f"{losses['ForCausalLMLoss']['page_faults']:.0f} page faults): {1000 * extra_loss:+.1f} ms, "
            f"{share:+.1%} of bare's step, "
            + ("a material part of the gap." if share > 0.02 else "not a material part of the gap.")
        )
        profile_bare = run["profiles"]["bare"]["breakdown"]
        profile_ours = run["profiles"]["train_step_full"]["breakdown"]
        bookkeeping = sum(
            profile_ours[label]
            for label, _, _ in BREAKDOWN
            if label.startswith(("rmpl poison", "rmpl reduce", "Tensor"))
        )
        lines.append(
            f"{run_label(run)}, profile: train_step's backward {profile_ours['DeepSpeed backward']:.3f} s versus "
            f"bare's {profile_bare['DeepSpeed backward']:.3f} s; forward + loss "
            f"{profile_ours['DeepSpeed forward'] + profile_ours['rmpl stream_loss (per-sample weighted loss)']:.3f} s "
            f"versus {profile_bare['DeepSpeed forward']:.3f} s; the loop's own bookkeeping (poison_non_finite, "
            f"reduce_sums, .tolist, .item) {1000 * bookkeeping:.1f} ms per step."
        )
    ours = next((r for r in report["runs"] if r["allocator"] == "rmpl" and r["world_size"] == 1), None)
    glibc = next((r for r in report["runs"] if r["allocator"] == "glibc" and r["world_size"] == 1), None)
    if ours and glibc:
        before, after = glibc["summary"]["bare"]["cpu_s_per_step"], ours["summary"]["bare"]["cpu_s_per_step"]
        faults = (glibc["summary"]["bare"]["page_faults_per_step"], ours["summary"]["bare"]["page_faults_per_step"])
        lines.append(
            f"The package's allocator setting (configure_cpu_rank: glibc keeps 1 GiB of freed memory) takes bare's CPU "
            f"per step from {before:.3f} s to {after:.3f} s ({after / before - 1:+.0%}) and its page faults from "
            f"{faults[0]:.0f} to {faults[1]:.0f} per step, for every loop alike: with glibc's defaults each step's "
            "large temporaries (logits, ZeRO-2 buckets) go back to the kernel and are faulted in again. A CPU-only "
            "cost: CUDA's caching allocator reuses device memory."
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Engine overhead benchmark: our training loop versus a bare DeepSpeed loop",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {machine_line(report)}; no GPU lent to this task, so no GPU numbers (CPU ranks, gloo)",
        f"- date: {report['date']}",
        f"- code: rmpl_ds at {report['revision']}",
        f"- model: {report['model']}",
        f"- batches: {report['batches']}",
        f"- method: one engine per launcher run; the four loops alternate in blocks of steps (order rotated every "
        f"round) after {WARMUP_STEPS} warmup steps each; medians over the blocks of rank 0's per-step counters",
        "- loops: bare = `engine(**inputs).loss` (the model's own loss on every position's logits), backward, step; "
        "full = our `train_step` on the same full logits (`loss_path=full_logits`): against bare, the loop's "
        "overhead; lean = our `train_step` as training runs it (the recipe's `target_only` loss: the LM head on the "
        "target positions only); loop = the stage runner's whole loop body without checkpoints (lean + metrics + "
        "metrics.jsonl and TensorBoard every step)",
        "",
        "Steps/s: 1 / median wall time per optimizer step. CPU: median user + system seconds per step of rank 0's "
        "process (all threads). Ratios are ours relative to bare, per round (paired blocks), median over rounds "
        "[q1, q3 over rounds]: wall = bare's wall time / ours (= steps/s ratio), CPU = bare's CPU / ours (the "
        "steps/s ratio of a CPU-bound rank; steadier, since other jobs share the 2 CPUs and swing the wall clock). "
        "Goal for the overhead (full vs bare): ≥ 0.95.",
        "",
        "| run | blocks × steps | steps/s bare / full / lean / loop | wall ratio full (lean, loop) | CPU s/step "
        "bare / full / lean / loop | CPU ratio full (lean, loop) | page faults per step bare / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        summary = run["summary"]
        rates = " / ".join(f"{summary[name]['steps_per_s']:.2f}" for name in LOOPS)
        cpus = " / ".join(f"{summary[name]['cpu_s_per_step']:.3f}" for name in LOOPS)
        full, lean, loop = (summary[f"{name}_vs_bare"] for name in ("train_step_full", "train_step", "loop"))
        faults = (
            f"{summary['bare']['page_faults_per_step']:.0f} / {summary['train_step_full']['page_faults_per_step']:.0f}"
        )
        lines.append(
            f"| {run_label(run)} | {run['rounds']} × {run['block']} | {rates} | "
            f"{spread(full['steps_per_s'])} ({lean['steps_per_s']['median']:.3f}, "
            f"{loop['steps_per_s']['median']:.3f}) | {cpus} | {spread(full['cpu_steps_per_s'])} "
            f"({lean['cpu_steps_per_s']['median']:.3f}, {loop['cpu_steps_per_s']['median']:.3f}) | {faults} |"
        )
    lines += ["", "## Findings", "", *[f"- {line}" for line in findings(report)]]
    for run in report["runs"]:
        bare, ours = run["profiles"]["bare"], run["profiles"]["train_step_full"]
        lines += [
            "",
            f"## Where the time goes: {run_label(run)}; cProfile of {PROFILE_STEPS} steps per loop, rank 0",
            "",
            "Cumulative seconds per optimizer step (the profiler slows Python-heavy code more than kernels).",
            "",
            "| part | bare | train_step (full logits) |",
            "|---|---:|---:|",
            f"| whole step | {bare['seconds_per_step']:.4f} | {ours['seconds_per_step']:.4f} |",
        ]
        for label, _, _ in BREAKDOWN:
            lines.append(f"| {label} | {bare['breakdown'][label]:.4f} | {ours['breakdown'][label]:.4f} |")
        losses = run["loss_parts"]
        ours_loss, model_loss = losses["stream_loss"], losses["ForCausalLMLoss"]
        lines += [
            "",
            f"The loss alone on the same {losses['logits_dtype']} logits {tuple(losses['logits_shape'])}, forward + "
            f"backward (median of alternated calls): ours (stream_loss) {ours_loss['cpu']:.4f} s CPU and "
            f"{ours_loss['page_faults']:.0f} page faults, the model's ForCausalLMLoss {model_loss['cpu']:.4f} s and "
            f"{model_loss['page_faults']:.0f}.",
        ]
    return "\n".join(lines) + "\n"


def parse_run(spec: str) -> tuple[int, str]:
    """``"2"`` → 2 ranks set up as training sets them up; ``"1+glibc"`` → 1 rank with glibc's allocator defaults."""
    ranks, _, option = spec.partition("+")
    if not ranks.isdigit() or int(ranks) < 1 or option not in ("", "glibc"):
        raise argparse.ArgumentTypeError(f"expected RANKS or RANKS+glibc, got {spec!r}")
    return int(ranks), option or "rmpl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 1-rank run, 2 rounds of 2 steps")
    parser.add_argument(
        "--runs",
        type=parse_run,
        nargs="+",
        default=[(1, "rmpl"), (1, "glibc"), (2, "rmpl")],
        metavar="RANKS[+glibc]",
        help="launcher runs: CPU ranks, +glibc for glibc's allocator defaults (default: 1 1+glibc 2)",
    )
    parser.add_argument("--mode", choices=("full", "lora"), default="full", help="model.mode (the demo's: full)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of blocks")
    parser.add_argument("--block", type=int, default=1, help="optimizer steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    # Set by the driver for the ranks it launches.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demo", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=("rmpl", "glibc"), default="rmpl", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.runs, args.rounds, args.block = [(1, "rmpl")], 2, 2

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        demo = build_demo(Path(scratch))
        for ranks, allocator in args.runs:
            result = launch(demo, Path(scratch), ranks, allocator, args)
            result["summary"] = summarize(result)
            runs.append(result)
            print(json.dumps({"run": run_label(result), **result["summary"]}), flush=True)

    first = runs[0]
    report = {
        "command": " ".join(["python", *sys.argv])
        if argv is None
        else "python bench/bench_engine.py " + " ".join(argv),
        "machine": machine("torch", "deepspeed", "transformers", "peft"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(),
        "model": (
            f"tiny Qwen2-VL (build_tiny seed 0), mode {first['mode']}, {first['parameters'] / 1e6:.2f} M parameters "
            f"({first['trainable_parameters'] / 1e6:.2f} M trainable), bf16, gradient checkpointing, ZeRO-2 "
            f"(the zero2 config), {first['threads_per_rank']} torch thread per rank"
        ),
        "batches": (
            f"{HELD_BATCHES} pre-collated micro-batches of 8 per rank from the demo's Stage I (ace:t, swig:i, mnre:r), "
            f"cycled; {first['mean_padded_tokens_per_micro_batch']:.0f} padded tokens per micro-batch on rank 0; "
            f"accumulation {first['accumulation']}"
        ),
        "runs": runs,
    }
    report["findings"] = findings(report)
    write_results(args.out, "engine", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
