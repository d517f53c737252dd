"""Benchmark: the lean training path versus today's, on a model of the real class with the real vocabulary.

Three paths over the same model, batch and optimizer (a LoRA step as the paper recipes train it):

* ``before``: what a step did before the lean path. Logits for every position (``model.loss: full_logits``) and
  the input-gradient hooks transformers and PEFT put on every sub-model's input embeddings
  (``enable_input_require_grads``), so backward also runs through the frozen vision tower;
* ``target_only``: the LM head on the target positions only (``model.loss: target_only``), hooks as before;
* ``lean``: target-only and no input-gradient hooks: the package's default (rmpl_ds.loss, rmpl_ds.backbones.loading).

The model: the tiny Qwen2-VL of the tests (Qwen2VLForConditionalGeneration, hidden 128, 2 layers, a 64-wide
2-layer ViT) with the real vocabulary size, 152,064, and the published image processor (a 512x512 image is
504x504, 1,296 patches, 324 image tokens). Micro batch 2, each sample a 512x512 image, a prompt of ~300 text
tokens and a target of ~60 (the counts are measured and written with the results), bf16 weights as the recipes
train, LoRA r=64 on the seven language-model projections, gradient checkpointing, torch AdamW; one training step =
forward, backward, optimizer step.

Each (path, round) runs in a fresh process: it loads the model, runs ``--warmup`` steps, resets the kernel's
resident-set high-water mark (``/proc/self/clear_refs``), runs ``--steps`` timed steps and reports the peak RSS of
those steps above the RSS before them (``step_peak_mib``), the process's peak RSS (``process_peak_mib``) and the
median step time. The paths take turns within each round (their order rotates), so the machine's contention hits
them alike, and each ratio to ``before`` is taken within a round and summarized by its median and range.

On this tiny model the LM head is most of a step's compute, so the speed-up overstates what a 7B model gains
(there the head is ~7 % of the matmul FLOPs, notes/MEMORY_AND_SPEED.md §4.2); the memory saved per projected
position is the same at any model size (vocabulary x 10 B), which is what the planner uses.

Usage: python bench/bench_lean.py [--rounds 5] [--steps 6] [--warmup 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data import machine, machine_line, revision
from benchlib import spread, spread_cell, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PATHS = ("before", "target_only", "lean")
REAL_VOCAB = 152_064
# The published Qwen2-VL preprocessor's pixel cap (preprocessor_config.json), so 512x512 keeps its 324 tokens.
PUBLISHED_MAX_PIXELS = 12_845_056
MICRO_BATCH = 2
PROMPT_TEXT_TOKENS = 300
TARGET_TOKENS = 60


# ------------------------------------------------------------------------------------------------ setup


def build_model(out: Path) -> Path:
    """The tiny Qwen2-VL with the real vocabulary size and the published image processor (random init, bf16)."""
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from rmpl_ds.backbones.tiny import build_tiny

    tiny = build_tiny("qwen2-vl", out / "tiny", seed=0)
    config = AutoConfig.from_pretrained(tiny)
    config.vocab_size = REAL_VOCAB
    config.get_text_config().vocab_size = REAL_VOCAB
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model_dir = out / "qwen2-vl-real-vocab"
    model.save_pretrained(model_dir)
    for item in tiny.iterdir():
        if item.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(item, model_dir / item.name)
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    preprocessor["max_pixels"] = PUBLISHED_MAX_PIXELS
    (model_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return model_dir


def examples(tokenizer: Any) -> list[Any]:
    """Two image examples with ~PROMPT_TEXT_TOKENS prompt text tokens and ~TARGET_TOKENS target tokens."""
    import numpy as np
    from PIL import Image

    from rmpl_ds.example import Example
    from rmpl_ds.ontology import EVENT_TYPES, IMAGE_ROLES

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    schema = " ".join(f"{event_type} ({', '.join(IMAGE_ROLES[event_type])})." for event_type in EVENT_TYPES)
    system = "Extract every event the image shows, with the boxes of its arguments. Types: " + schema
    while n_tokens(system) < PROMPT_TEXT_TOKENS - 20:
        system += " Answer with one line per event; write none when the image shows no event."
    boxes = ["[121,100,412,998]", "[386,112,799,998]", "[10,20,300,400]", "[500,520,990,870]", "[33,44,555,666]"]
    target = "Justice:Arrest-Jail | " + " ; ".join(f"Agent: {box}" for box in boxes)
    while n_tokens(target) > TARGET_TOKENS:
        boxes.pop()
        target = "Justice:Arrest-Jail | " + " ; ".join(f"Agent: {box}" for box in boxes)
    rng = np.random.default_rng(0)
    return [
        Example(
            "AR",
            system,
            f"What happens in image {index}? Give the Agent and Person boxes.",
            target,
            (Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)),),
            key=f"bench-{index}",
        )
        for index in range(MICRO_BATCH)
    ]


# ------------------------------------------------------------------------------------------------ one process


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(model_dir: Path, path: str, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """One path in this (fresh) process: see the module docstring."""
    import torch

    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.collate import model_inputs
    from rmpl_ds.config import LoraConfig
    from rmpl_ds.loss import forward_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    adapter = get_adapter("qwen2-vl")
    model, bundle = adapter.load(model_dir, "lora", lora=LoraConfig(rank=64, alpha=128, dropout=0.05))
    if path in ("before", "target_only"):
        model.get_base_model().enable_input_require_grads()  # what transformers and PEFT left in place before
    loss_path = "full_logits" if path == "before" else "target_only"
    batch = bundle.collator()([bundle.encode(example, max_seq_len=2048) for example in examples(bundle.tokenizer)])
    inputs = model_inputs(batch)
    labels, weights = inputs.pop("labels"), torch.ones(MICRO_BATCH)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> tuple[float, float]:
        began = time.perf_counter()
        loss = forward_loss(model, inputs, labels, weights, path=loss_path).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began, float(loss)

    for _ in range(warmup):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_mib("VmRSS")
    results = [step() for _ in range(steps)]
    times = [seconds for seconds, _ in results]
    stats = batch["stats"]
    return {
        "path": path,
        "step_s": statistics.median(times),
        "steps_per_s": 1.0 / statistics.median(times),
        "step_peak_mib": rss_mib("VmHWM") - before,
        "process_peak_mib": rss_mib("VmHWM"),
        "loss": results[-1][1],
        "tokens_per_sample": stats.real_tokens / stats.examples,
        "target_tokens_per_sample": stats.target_tokens / stats.examples,
        "image_tokens_per_sample": sum(batch["image_grid_thw"].prod(dim=1).tolist()) // 4 // stats.examples,
    }


# ------------------------------------------------------------------------------------------------ driver


def run_child(model_dir: Path, path: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(model_dir),
        path,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT / "bench", check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for path in PATHS:
        rows = [r[path] for r in rounds]
        summary[path] = {
            key: statistics.median(row[key] for row in rows)
            for key in ("steps_per_s", "step_s", "step_peak_mib", "process_peak_mib")
        }
        if path != "before":
            summary[path]["speedup"] = spread([r[path]["steps_per_s"] / r["before"]["steps_per_s"] for r in rounds])
            summary[path]["memory_ratio"] = spread(
                [r["before"]["step_peak_mib"] / r[path]["step_peak_mib"] for r in rounds]
            )
    return summary


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    shapes = report["shapes"]
    lines = [
        "# Lean training path: target-only LM head and no backward through the frozen vision tower",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {machine_line(report)}  ",
        f"Date: {report['date']}; code: {report['revision']}",
        "",
        f"Model: {report['model']}. Batch: micro batch {MICRO_BATCH}, per sample {shapes['tokens_per_sample']:.0f} "
        f"tokens ({shapes['image_tokens_per_sample']:.0f} image tokens of a 512x512 image, "
        f"{shapes['target_tokens_per_sample']:.0f} target tokens, the rest prompt text); LoRA r=64 on the seven "
        "language-model projections, bf16, gradient checkpointing, torch AdamW; a step = forward + backward + "
        f"optimizer step. {report['rounds']} rounds; in each, every path ran {report['steps']} timed steps after "
        f"{report['warmup']} warm-up steps in a fresh process, with {report['threads']} torch threads.",
        "",
        "| path | steps/s | step peak RSS (MiB above the step's start) | process peak RSS (MiB) | steps/s vs before "
        "(median [min, max]) | step peak memory, before / this (median [min, max]) |",
        "|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        row = s[path]
        speed = row.get("speedup")
        memory = row.get("memory_ratio")
        lines.append(
            f"| {path} | {row['steps_per_s']:.3f} | {row['step_peak_mib']:.0f} | {row['process_peak_mib']:.0f} | "
            f"{spread_cell(speed)} | {spread_cell(memory)} |"
        )
    lines += [
        "",
        "Paths: `before` = logits for every position + the input-gradient hooks transformers/PEFT install "
        "(backward runs through the frozen ViT), the package before the lean path; `target_only` = the LM head on the "
        "target positions only, hooks kept; `lean` = target-only and no hooks, the package's default.",
        "",
        "The losses of the three paths agree (last timed step: "
        + ", ".join(f"{path} {report['rounds_data'][0][path]['loss']:.4f}" for path in PATHS)
        + "; tests/test_loss.py holds losses and gradients equal). On this tiny model the LM head is most of the "
        "compute, so the speed-up is larger than a 7B model would see; the memory saved per position not projected "
        f"(vocabulary x 10 B = {REAL_VOCAB * 10 / 2**20:.2f} MiB) is the same at any model size.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.steps, args.warmup, args.threads)))
        return 0
    if args.quick:
        args.rounds, args.steps = 2, 3
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        model_dir = build_model(Path(tmp))
        rounds = []
        for index in range(args.rounds):
            order = PATHS[index % len(PATHS) :] + PATHS[: index % len(PATHS)]
            rounds.append({path: run_child(model_dir, path, args) for path in order})
            print(
                f"round {index + 1}: "
                + ", ".join(
                    f"{p} {rounds[-1][p]['steps_per_s']:.3f} steps/s {rounds[-1][p]['step_peak_mib']:.0f} MiB"
                    for p in PATHS
                ),
                file=sys.stderr,
            )
    first = rounds[0]["lean"]
    report = {
        "benchmark": "lean",
        "command": "python bench/bench_lean.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "revision": revision(),
        "machine": machine("torch", "transformers", "peft"),
        "model": f"tiny Qwen2VLForConditionalGeneration (build_tiny seed 0) with vocab_size {REAL_VOCAB}",
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "shapes": {
            key: first[key] for key in ("tokens_per_sample", "target_tokens_per_sample", "image_tokens_per_sample")
        },
        "summary": summarize(rounds),
        "rounds_data": rounds,
    }
    write_results(args.out, "lean", report, render)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
