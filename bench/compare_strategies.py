"""Four training strategies on one backbone, data, sampler, engine and scorer: RMPL vs X-MTL vs LLaVA-MS-PIT vs joint.

Runs each recipe's whole pipeline (`rmpl-ds pipeline`, stages under the deepspeed launcher, M2E2 evaluation of every
stage's export) one after the other, then writes one table in the paper's Table 2 layout (the final model of each
strategy) and one bar chart::

    python bench/compare_strategies.py                       # the demo-size variants (`make compare`)
    python bench/compare_strategies.py launch/recipes/rmpl_qwen2vl_7b.yaml launch/recipes/xmtl_qwen2vl_7b.yaml ...

Default recipes (the demo's tiny Qwen2-VL and synthetic data, 2 CPU ranks):

* ``demo.yaml``: RMPL (Stage I unified-schema warm-up over t/i/r, Stage II EM + AR);
* ``demo_xmtl.yaml``: X-MTL (EM + AR from the base model with dynamic weight averaging, then pseudo-labelled
  image-caption pairs mixed in at beta = 0.5);
* ``demo_pit.yaml``: LLaVA-MS-PIT (a schema stage of textual and visual schema questions, then RMPL's stages with
  schema-guided prompts);
* ``demo_joint.yaml``: M-MRE's joint task (RMPL with Stage II also training the joint EM + arguments target).

A pipeline whose stages and evaluations are already complete is reused (so ``make demo``'s run counts for RMPL).
Writes ``<out>/compare.md``, ``compare.json`` and ``compare_f1.png`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_model, revision

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "launch" / "recipes"
DEFAULT = {
    "RMPL": RECIPES / "demo.yaml",
    "X-MTL (DWA + pseudo-labels)": RECIPES / "demo_xmtl.yaml",
    "LLaVA-MS-PIT (schema curriculum)": RECIPES / "demo_pit.yaml",
    "M-MRE (joint EM + AR task)": RECIPES / "demo_joint.yaml",
}


def run_pipeline(recipe: Path, gpus: int | None) -> tuple[dict[str, Any], float]:
    command = [sys.executable, "-m", "rmpl_ds", "pipeline", str(recipe), *(["--gpus", str(gpus)] if gpus else [])]
    print("+", " ".join(command), flush=True)
    began = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT, env=os.environ.copy())
    seconds = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"{recipe}: the pipeline failed (exit code {code})")
    from rmpl_ds.config import load_recipe

    summary_path = load_recipe(recipe).out_dir() / "summary.json"
    return json.loads(summary_path.read_text(encoding="utf-8")), seconds


def describe(summary: dict[str, Any]) -> str:
    stages = summary["stages"]
    return " -> ".join(f"{name} ({info['steps']} steps)" for name, info in stages.items())


def render(report: dict[str, Any]) -> str:
    from rmpl_ds.evaluate.report import render_markdown

    rows = report["rows"]
    table = render_markdown(
        {row["strategy"]: row["scores"] for row in rows},
        preamble=(
            "Demo-size comparison: a TINY random-initialized model of the Qwen2-VL architecture and SYNTHETIC data in "
            "the real formats. It shows that each strategy runs end to end on the same shards, sampler, engine and "
            "strict scorer, and how each moves the demo's scores; it cannot say which strategy is best on real data."
        ),
    )
    table = table.replace("# M2E2 evaluation", "# Training strategies on the demo (final model of each)", 1)
    lines = [
        table.rstrip(),
        "",
        "## Runs",
        "",
        "| Strategy | Recipe | Stages | Held-out F1 at the exported step | Training (stages) | This command |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['strategy']} | `{row['recipe']}` | {row['stages']} | {row['held_out']} | "
            f"{row['training_s'] / 60:.1f} min | {row['wall_s'] / 60:.1f} min |"
        )
    lines += [
        "",
        "Training: the stages' own wall time (from their summaries; a stage finished by an earlier run is reused, "
        "so its time is that run's). This command: the pipeline's wall time now (shards, pseudo-labelling, training, "
        "evaluation of the base model and of every stage's export).",
    ]
    lines += [
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Revision: {report['revision']}; {report['versions']}  ",
        f"Date: {report['date']}; total wall time {report['total_s'] / 60:.1f} min",
        "",
        "![F1 per setting](compare_f1.png)",
        "",
    ]
    return "\n".join(lines)


def held_out(summary: dict[str, Any]) -> str:
    final = list(summary["stages"].values())[-1]
    selected = final.get("selected")
    if not selected:
        return "-"
    return f"{selected['metric']} {selected['value']:.2f} (step {selected['step']})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipes to compare (default: the four demo variants)")
    parser.add_argument("--gpus", type=int, default=None, help="ranks per pipeline (default: each recipe's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    chosen = {path.stem: path.resolve() for path in args.recipes} if args.recipes else DEFAULT
    began = time.perf_counter()
    rows = []
    for strategy, recipe in chosen.items():
        summary, seconds = run_pipeline(recipe, args.gpus)
        final = list(summary["stages"])[-1]
        rows.append(
            {
                "strategy": strategy,
                "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
                "stages": describe(summary),
                "held_out": held_out(summary),
                "wall_s": seconds,
                "training_s": sum(info["wall_time_s"] for info in summary["stages"].values()),
                "scores": summary["eval"][final],
            }
        )
    import deepspeed
    import torch
    import transformers

    report = {
        "command": "make compare"
        if not args.recipes
        else "python bench/compare_strategies.py " + " ".join(str(p) for p in args.recipes),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} (no GPU)"
        if not torch.cuda.is_available()
        else f"{torch.cuda.get_device_name(0)}",
        "revision": revision(),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed "
        f"{deepspeed.__version__}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "total_s": time.perf_counter() - began,
        "rows": rows,
    }
    from rmpl_ds.evaluate.report import plot_f1

    args.out.mkdir(parents=True, exist_ok=True)
    plot_f1({row["strategy"]: row["scores"] for row in rows}, args.out / "compare_f1.png")
    (args.out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    text = render(report)
    (args.out / "compare.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
