"""Benchmark: our stage runner versus the transformers ``Trainer`` loop that LLaMA-Factory and ms-swift train with.

Same model, examples, per-rank micro-batches, precision, checkpointing, optimizer settings and threads:

* the demo's tiny Qwen2-VL (real class), fully fine-tuned with the vision tower and projector as the demo trains
  it, loaded by the same ``BackboneAdapter.load`` (bf16 weights, non-reentrant gradient checkpointing);
* the demo's Stage II mixture (ACE and SWiG, EM and AR) from the demo shards, 2 CPU ranks x micro batch 8,
  accumulation 1 (global 16), 40 optimizer steps, lr 1e-3 with 10 warmup steps and a cosine schedule, AdamW
  (0.9, 0.999, 1e-8), gradient clipping 1.0;
* ``ours``: ``rmpl_ds.train`` (the stage runner, unchanged) under the ``deepspeed`` launcher, ZeRO stage as given;
* ``trainer``: a plain ``transformers.Trainer`` under ``torchrun`` (DDP on gloo), whose training dataloader is our
  loader for its rank (so both consume exactly the same micro-batches, with the same data work: reading,
  rendering, image processing in one worker per rank). Both runs record a fingerprint (sha1 of ``input_ids``) of
  every micro-batch each rank's model sees, through a forward hook; the bench asserts the two sequences are
  identical per rank;
* threads: torchrun gives each rank ``OMP_NUM_THREADS=1`` when it starts 2 ranks; our ranks set their own (see
  ``rmpl_ds.engine.configure_runtime``), also 1 per rank on this 2-core machine.

Each round runs both (the order alternates), each in fresh processes. Per run: steps/s between the 5th and the
last step (from per-step timestamps; start-up and the first steps excluded) and CPU seconds per step over the same
steps (the whole process tree's user + system time, sampled by this script when those steps are logged). The ratio
ours / trainer is taken within each round; the table gives its median and range. After the rounds, the models of
the last round are scored one way: the mean per-sample token-mean loss on 96 held-out examples of the same tasks
rendered from a second demo set (``write_demo`` seed 1), through ``rmpl_ds.loss`` (full logits).

``--zero`` runs ours at several ZeRO stages (``launch.zero_stage``) in the same rounds.

Usage: python bench/bench_trainer.py [--rounds 4] [--steps 40] [--zero 2 0] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data import DemoSet, build_demo, machine, machine_line, revision
from benchlib import spread, spread_cell, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO_RECIPE = ROOT / "launch" / "recipes" / "demo.yaml"
STAGE = "stage2"
WORLD = 2
FIRST_TIMED_STEP = 5
HELD_OUT_EXAMPLES = 96


def recipe_overrides(demo: DemoSet, steps: int) -> list[str]:
    return [
        f"model.path={demo.model}",
        *(f"sources.{name}={path}" for name, path in demo.shards.items()),
        f"stages.{STAGE}.init_from=null",
        f"stages.{STAGE}.steps={steps}",
        f"stages.{STAGE}.checkpoint_every={steps}",
        "logging.tensorboard=true",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------ inside the ranks


def fingerprint_hook(path: Path) -> Any:
    """A forward pre-hook appending the sha1 of each micro-batch's input_ids to ``path`` (one line each)."""
    sink = path.open("a", encoding="utf-8")

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        sink.write(hashlib.sha1(ids.detach().cpu().numpy().tobytes()).hexdigest() + "\n")
        sink.flush()

    return hook


def ours_rank(argv: list[str]) -> int:
    """One rank of ours: the stage runner with a fingerprint hook on the model it trains (nothing else changed)."""
    import rmpl_ds.train as train
    from rmpl_ds import dist, engine

    out = Path(argv[argv.index("--out") + 1])
    if os.environ.get("BENCH_NONDETERMINISTIC"):  # what the CPU bitwise-resume guarantee costs
        configure_runtime = engine.configure_runtime
        engine.configure_runtime = lambda *, deterministic: configure_runtime(deterministic=False)
    load_model = train.load_model

    def hooked(*args: Any, **kwargs: Any) -> Any:
        model, bundle, path = load_model(*args, **kwargs)
        model.register_forward_pre_hook(fingerprint_hook(out / f"fingerprints.rank{dist.rank()}"), with_kwargs=True)
        return model, bundle, path

    train.load_model = hooked
    return train.main(argv)


def trainer_rank(argv: list[str]) -> int:
    """One rank of the baseline: transformers.Trainer (DDP) over our loader for this rank."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from rmpl_ds import dist
    from rmpl_ds.config import batch_plan, load_recipe
    from rmpl_ds.data import StageData, close_batches
    from rmpl_ds.train import StageRun, load_model

    out = Path(argv[0])
    recipe = load_recipe(DEMO_RECIPE, argv[1:], world_size=WORLD)
    stage = recipe.stage(STAGE)
    plan = batch_plan(stage.global_batch, stage.micro_batch, WORLD)
    # torchrun already set OMP_NUM_THREADS=1 per rank; nothing else of ours is applied here (no allocator or
    # determinism settings, rmpl_ds.engine.configure_runtime is not called): what a user of the Trainer gets.
    torch.manual_seed(stage.seed)
    # The stage runner's own loading (same weights, trainable set, dtype and checkpointing), without ZeRO.
    model, bundle, _ = load_model(StageRun(recipe, stage, out), torch.device("cpu"), 0, None)
    model.register_forward_pre_hook(fingerprint_hook(out / f"fingerprints.rank{dist.rank()}"), with_kwargs=True)
    data = StageData.build(recipe, stage, bundle)
    loader = data.loader(
        next_slot=0, micro_batch=plan.micro_batch, num_workers=recipe.launch.num_workers, world=WORLD, rank=dist.rank()
    )

    class ModelBatches:
        """Our loader's micro-batches as the model's keyword arguments (labels included, our extras dropped)."""

        def __init__(self) -> None:
            self.batches = iter(loader)

        def __iter__(self) -> Any:
            for batch in self.batches:
                yield {k: v for k, v in batch.items() if k not in ("stats", "stream_index", "loss_weight")}

    model_batches = ModelBatches()

    class StepLog(TrainerCallback):
        def __init__(self) -> None:
            self.began = time.perf_counter()
            self.sink = (out / "steps.jsonl").open("a", encoding="utf-8") if dist.is_main() else None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.sink is not None:
                elapsed = time.perf_counter() - self.began
                self.sink.write(json.dumps({"step": state.global_step, "elapsed_s": elapsed}) + "\n")
                self.sink.flush()

    class LoaderTrainer(Trainer):
        def get_train_dataloader(self) -> Any:
            return model_batches

    arguments = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        max_steps=stage.steps,
        learning_rate=stage.lr,
        lr_scheduler_type="cosine",
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.grad_clip,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        bf16=True,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        gradient_checkpointing=False,  # already on, non-reentrant, as ours (BackboneAdapter.load)
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=stage.seed,
    )
    trainer = LoaderTrainer(model=model, args=arguments, callbacks=[StepLog()])
    trainer.train()
    close_batches(model_batches.batches)  # the stream is endless: its workers are stopped, not exhausted
    if dist.is_main():
        trainer.save_model(str(out / "model"))
        bundle.save(out / "model")
    return 0


# ---------------------------------------------------------------------------------------------- the driver


def tree_cpu_seconds(pid: int) -> float:
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def watch(process: subprocess.Popen, steps_file: Path, steps: int, timeout: float = 900.0) -> dict[str, Any]:
    """Wait for the run; sample the process tree's CPU time when the first timed step and the last are logged."""
    samples: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        lines = steps_file.read_text().splitlines() if steps_file.exists() else []
        done = len(lines)
        for mark in (FIRST_TIMED_STEP, steps):
            if done >= mark and mark not in samples:
                samples[mark] = tree_cpu_seconds(process.pid)
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        raise SystemExit(f"timed out: {steps_file}")
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise SystemExit(f"run failed ({process.returncode}): {steps_file}\n{output[-4000:]}")
    rows = [json.loads(line) for line in steps_file.read_text().splitlines()]
    by_step = {row["step"]: row["elapsed_s"] for row in rows}
    first, last = FIRST_TIMED_STEP, max(by_step)
    wall = by_step[last] - by_step[first]
    cpu = samples.get(steps, float("nan")) - samples.get(FIRST_TIMED_STEP, float("nan"))
    return {
        "steps_per_s": (last - first) / wall,
        "cpu_s_per_step": cpu / (last - first),
        "timed_steps": last - first,
        "final_loss": rows[-1].get("loss"),
    }


def run_ours(demo: DemoSet, out: Path, steps: int, zero: int, *, nondeterministic: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [
        str(deepspeed),
        "--num_gpus",
        str(WORLD),
        "--master_port",
        str(free_port()),
        str(Path(__file__)),
        "--role",
        "ours",
        str(DEMO_RECIPE),
        "--stage",
        STAGE,
        "--out",
        str(out),
        "--resume",
        "none",
        *recipe_overrides(demo, steps),
        f"launch.zero_stage={zero}",
    ]
    env = dict(os.environ, BENCH_NONDETERMINISTIC="1") if nondeterministic else None
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    result = watch(process, out / STAGE / "metrics.jsonl", steps)
    result["model"] = str(out / STAGE / "export")
    return result


def run_trainer(demo: DemoSet, out: Path, steps: int, *, malloc_pad: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [
        str(torchrun),
        f"--nproc_per_node={WORLD}",
        f"--master_port={free_port()}",
        str(Path(__file__)),
        "--role",
        "trainer",
        str(out),
        *recipe_overrides(demo, steps),
    ]
    env = dict(os.environ, MALLOC_TOP_PAD_=str(1 << 30)) if malloc_pad else None
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    result = watch(process, out / "steps.jsonl", steps)
    result["model"] = str(out / "model")
    return result


def same_micro_batches(a: Path, b: Path) -> bool:
    for rank in range(WORLD):
        first = (a / f"fingerprints.rank{rank}").read_text().split()
        second = (b / f"fingerprints.rank{rank}").read_text().split()
        if first != second or not first:
            return False
    return True


def held_out_loss(models: dict[str, str], root: Path) -> dict[str, float]:
    """Mean per-sample token-mean loss (full logits) of each model on held-out Stage II examples (demo seed 1)."""
    import numpy as np
    import torch

    from rmpl_ds import records, tasks
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.collate import model_inputs
    from rmpl_ds.data import choose_event_type
    from rmpl_ds.loss import forward_loss
    from rmpl_ds.shards import ShardSet

    held_out = build_demo(root / "held-out", size=120, seed=1)
    items = []
    for source in ("ace", "swig"):
        shard_set = ShardSet.open(held_out.shards[source])
        for index in range(min(len(shard_set), HELD_OUT_EXAMPLES // 2)):
            items.append(shard_set.read(index))
    results = {}
    adapter = get_adapter("qwen2-vl")
    for name, path in models.items():
        model, bundle = adapter.load(path, "full", dtype=torch.bfloat16, gradient_checkpointing=False)
        model.eval()
        losses = []
        for number, item in enumerate(items):
            record = records.from_json(item["json"])
            image = next((item[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in item), None)
            if isinstance(record, records.TextSentence):
                image = None
            task = ("EM", "AR")[number % 2]
            event_type = choose_event_type(record, np.random.default_rng(number)) if task == "AR" else None
            example = tasks.render(record, task, image=image, event_type=event_type)
            batch = bundle.collator()([bundle.encode(example, max_seq_len=768)])
            inputs = model_inputs(batch)
            labels = inputs.pop("labels")
            with torch.no_grad():
                losses.append(float(forward_loss(model, inputs, labels, torch.ones(1), path="full_logits").loss))
        results[name] = statistics.mean(losses)
    return results


def summarize(rounds: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in variants:
        rows = [r[name] for r in rounds]
        summary[name] = {
            "steps_per_s": statistics.median(row["steps_per_s"] for row in rows),
            "cpu_s_per_step": statistics.median(row["cpu_s_per_step"] for row in rows),
        }
        if name != "trainer":
            speed = [r[name]["steps_per_s"] / r["trainer"]["steps_per_s"] for r in rounds]
            cpu = [r[name]["cpu_s_per_step"] / r["trainer"]["cpu_s_per_step"] for r in rounds]
            summary[name]["speed_vs_trainer"] = spread(speed)
            summary[name]["cpu_vs_trainer"] = spread(cpu)
    if "ours ZeRO-2 nondeterministic" in variants and "ours ZeRO-2" in variants:
        # what the deterministic algorithms behind the CPU bitwise-resume guarantee cost, paired per round
        summary["determinism_cost"] = spread(
            [r["ours ZeRO-2 nondeterministic"]["steps_per_s"] / r["ours ZeRO-2"]["steps_per_s"] for r in rounds]
        )
    return summary


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Our stage runner versus the transformers Trainer loop (torchrun, DDP on gloo)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {machine_line(report)}  ",
        f"Date: {report['date']}; code: {report['revision']}",
        "",
        "Setup: the demo's tiny Qwen2-VL fully fine-tuned (vision tower and projector included), bf16, non-reentrant "
        f"gradient checkpointing; the demo's Stage II mixture; {WORLD} CPU ranks x micro batch 8, global batch 16; "
        f"{report['steps']} optimizer steps per run, timed from step {FIRST_TIMED_STEP} on; AdamW, lr 1e-3, 10 warmup "
        "steps, cosine; clipping 1.0; one torch thread per rank. Per-rank micro-batches identical in every round "
        f"(fingerprints compared): {report['same_micro_batches']}. {report['rounds']} rounds, order alternating.",
        "",
        "| run | steps/s | CPU s / step (process tree) | steps/s vs Trainer (median [min, max]) | CPU vs Trainer |",
        "|---|---|---|---|---|",
    ]
    for name, row in s.items():
        if name == "determinism_cost":
            continue
        speed, cpu = row.get("speed_vs_trainer"), row.get("cpu_vs_trainer")
        lines.append(
            f"| {name} | {row['steps_per_s']:.3f} | {row['cpu_s_per_step']:.3f} | {spread_cell(speed)} | "
            f"{spread_cell(cpu, '1')} |"
        )
    if "determinism_cost" in s:
        lines += [
            "",
            "What the deterministic algorithms cost (they make a resumed CPU run bitwise equal to an uninterrupted "
            "one): without them ours runs at " + spread_cell(s["determinism_cost"]) + " its own steps/s (paired).",
        ]
    held = report.get("held_out_loss")
    if held:
        lines += [
            "",
            f"Held-out loss (mean per-sample token-mean loss, {HELD_OUT_EXAMPLES} Stage II examples of a second demo "
            "set, the last round's models, one scoring function): "
            + ", ".join(f"{name} {value:.3f}" for name, value in held.items())
            + ".",
        ]
    lines += ["", report.get("notes", ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if argv[:2] == ["--role", "ours"]:
        return ours_rank(argv[2:])
    if argv[:2] == ["--role", "trainer"]:
        return trainer_rank(argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 0], help="ZeRO stages of ours to run")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["nondeterministic", "trainer+pad"],
        choices=["nondeterministic", "trainer+pad"],
        help="also: ours at ZeRO-2 without deterministic algorithms; the Trainer with our allocator padding",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 15 steps, ZeRO-2 only")
    parser.add_argument("--no-held-out", action="store_true")
    parser.add_argument("--notes", default="", help="a line for the results (what the code under test changed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, help="re-summarize and re-render a results JSON (no runs)")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        names = list(report["rounds_data"][0])
        variants = [name for name in names if name != "trainer"] + ["trainer"]
        report["summary"] = summarize(report["rounds_data"], variants)
        write_results(args.out, "trainer", report, render)
        return 0
    if args.quick:
        args.rounds, args.steps, args.zero, args.extra = 2, 15, [2], []
    variants = [f"ours ZeRO-{zero}" for zero in args.zero]
    variants += ["ours ZeRO-2 nondeterministic"] if "nondeterministic" in args.extra else []
    variants += ["trainer"] + (["trainer + malloc pad"] if "trainer+pad" in args.extra else [])
    rounds: list[dict[str, Any]] = []
    same = True
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        demo = build_demo(root / "demo")
        for index in range(args.rounds):
            order = variants if index % 2 == 0 else variants[::-1]
            results = {}
            for name in order:
                out = root / f"round{index}" / name.replace(" ", "-").replace("+", "plus")
                if name.startswith("trainer"):
                    results[name] = run_trainer(demo, out, args.steps, malloc_pad="pad" in name)
                else:
                    zero = int(name.split("ZeRO-")[1].split()[0])
                    results[name] = run_ours(demo, out, args.steps, zero, nondeterministic="nondeterministic" in name)
                results[name]["dir"] = str(out)
            for name in variants:
                same = same and same_micro_batches(Path(results[name]["dir"]), Path(results["trainer"]["dir"]))
            rounds.append(results)
            line = ", ".join(
                f"{n} {results[n]['steps_per_s']:.3f} steps/s {results[n]['cpu_s_per_step']:.3f} CPU s"
                for n in variants
            )
            print(f"round {index + 1}: {line}", file=sys.stderr)
        held = None
        if not args.no_held_out:
            held = held_out_loss({name: rounds[-1][name]["model"] for name in variants}, root)
    report = {
        "benchmark": "trainer",
        "command": "python bench/bench_trainer.py " + " ".join(argv),
        "date": datetime.date.today().isoformat(),
        "revision": revision(),
        "machine": machine("torch", "transformers", "deepspeed", "peft"),
        "rounds": args.rounds,
        "steps": args.steps,
        "same_micro_batches": same,
        "summary": summarize(rounds, variants),
        "held_out_loss": held,
        "notes": args.notes,
        "rounds_data": rounds,
    }
    write_results(args.out, "trainer", report, render)
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
