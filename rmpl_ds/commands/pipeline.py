"""Run a whole recipe: build or reuse shards, every stage under the deepspeed launcher (Stage I -> hand-off ->
Stage II), evaluate the base model and each stage's model on M2E2, and write the report.

    rmpl-ds pipeline launch/recipes/demo.yaml                     # what `make demo` runs (2 CPU ranks)
    rmpl-ds pipeline launch/recipes/rmpl_qwen2vl_7b.yaml --gpus 2  # the paper on 2 GPUs

A finished stage is not run again and an interrupted one resumes from its newest complete checkpoint, so an
interrupted pipeline is continued by running the same command again. Output: <run dir>/summary.json,
report.md (Table 2 per model, curves, run facts), f1.png, curves_<stage>.png, and tensorboard/<stage>, tensorboard/eval.
"""

from __future__ import annotations

import argparse

HELP = "run a whole recipe: shards, stages, evaluation, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    parser.add_argument("--out", default=None, help="run directory (default: the recipe's output_dir)")
    parser.add_argument("--gpus", type=int, default=None, help="processes per node (default: the recipe's launch.gpus)")
    parser.add_argument("--force", action="store_true", help="train although the memory planner says it does not fit")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the launcher's and libraries' output too (always written to <run dir>/<stage>/train.log)",
    )


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.pipeline import run_pipeline

    summary = run_pipeline(
        args.recipe, args.overrides, out=args.out, gpus=args.gpus, force=args.force, verbose=args.verbose
    )
    run_dir = summary["run_dir"]
    print(f"\nreport:      {summary['report']}")
    print(f"summary:     {run_dir}/summary.json")
    print(f"plots:       {run_dir}/f1.png, {run_dir}/curves_<stage>.png")
    print(f"tensorboard: tensorboard --logdir {run_dir}/tensorboard   (then open http://localhost:6006)")
    for setting, margin in summary["learning_margin_em_f1"].items():
        macro = summary["learning_margin_em_macro_f1"][setting]
        print(
            f"learning:    event mention {setting}: micro-F1 {margin:+.2f}, macro-F1 {macro:+.2f} points over the "
            "untrained base model"
        )
    return 0
