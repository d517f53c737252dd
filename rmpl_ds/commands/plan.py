"""Predict per-GPU memory for a fine-tuning setup: breakdown, total against the card, verdict, largest micro-batch.

Either describe the setup (the defaults are the paper's: LoRA r=64, 2 GPUs of 24 GiB, ZeRO-2 with the package's
ds_configs/zero2.json buckets, bf16, gradient checkpointing) or give a recipe, whose most demanding stage is
planned with its DeepSpeed config. Every formula, with its source, is in the docstring of the rmpl_ds.plan module
(`python -c "import rmpl_ds.plan; help(rmpl_ds.plan)"`).

Examples:
  rmpl-ds plan --backbone qwen2-vl-7b --mode lora --gpus 2 --gpu-mem-gb 24 --seq-len 1024
  rmpl-ds plan --backbone internvl3_5-8b --mode qlora --micro-batch 2 --json
  rmpl-ds plan --backbone path/to/model_dir --mode full --gpus 8 --gpu-mem-gb 80 --offload
  rmpl-ds plan --recipe launch/recipes/rmpl_qwen2vl_7b.yaml --gpus 2 model.lora.rank=32
  rmpl-ds plan --recipe launch/recipes/rmpl_qwen2vl_7b.yaml --compare-losses   # target-only head vs full logits
"""

from __future__ import annotations

import argparse
import json

from rmpl_ds.backbones import specs
from rmpl_ds.errors import UserError

HELP = "predict per-GPU memory (weights, ZeRO states, activations) and the largest micro batch that fits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--backbone",
        help=f"{', '.join(spec.size_name for spec in specs())}, or a model directory with config.json",
    )
    source.add_argument("--recipe", help="a recipe YAML: plans its most demanding stage (or --stage)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides (with --recipe)")
    parser.add_argument(
        "--stage", help="with --recipe: plan this stage instead of the one with the largest micro batch"
    )
    parser.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora", help="default lora")
    parser.add_argument("--gpus", type=int, default=None, help="data-parallel GPUs (default 2, or the recipe's)")
    parser.add_argument(
        "--gpu-mem-gb", type=float, default=24.0, help="memory of one GPU as marketed, i.e. GiB (default 24: RTX 4090)"
    )
    parser.add_argument("--lora-rank", type=int, default=64, help="default 64")
    parser.add_argument("--lora-targets", help="comma-separated Linear names (default q/k/v/o/gate/up/down_proj)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="default 0.05 (> 0 keeps dropped inputs)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, image tokens included")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per micro-step (default 1)")
    parser.add_argument("--image-tokens", type=int, help="LLM tokens per image (default: from --image-size)")
    parser.add_argument("--image-size", type=int, default=512, help="square image side in px (default 512)")
    parser.add_argument("--zero", type=int, choices=(1, 2), default=2, help="ZeRO stage (default 2)")
    parser.add_argument("--offload", action="store_true", help="offload optimizer states to CPU memory")
    parser.add_argument(
        "--reduce-bucket-size", type=float, default=None, help="ZeRO reduce bucket, elements (default 5e7)"
    )
    parser.add_argument("--no-overlap-comm", action="store_true", help="one reduce buffer instead of two")
    parser.add_argument(
        "--loss",
        choices=("target_only", "full_logits", "fused"),
        default=None,
        help="LM head + loss path (default: the recipe's model.loss, else target_only): target_only projects the "
        "target positions only, full_logits every position, fused = a Liger-style linear + cross-entropy",
    )
    parser.add_argument(
        "--target-tokens",
        type=int,
        default=None,
        help="target tokens per sample the LM head projects under target_only (default 256; a recipe's "
        "model.max_target_tokens)",
    )
    parser.add_argument(
        "--compare-losses", action="store_true", help="also show the totals under every loss path (old vs new)"
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--train-vision-tower", action="store_true", help="train the whole vision tower")
    parser.add_argument("--train-projector", action="store_true", help="train the vision-to-LLM projector")
    parser.add_argument("--fp32", action="store_true", help="fp32 compute instead of bf16")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# Flags for what a recipe already describes (--gpus, --gpu-mem-gb and --loss apply to both; --loss overrides
# model.loss).
_SETUP_FLAGS = {
    "--mode": "mode",
    "--lora-rank": "lora_rank",
    "--lora-targets": "lora_targets",
    "--lora-dropout": "lora_dropout",
    "--seq-len": "seq_len",
    "--micro-batch": "micro_batch",
    "--image-tokens": "image_tokens",
    "--image-size": "image_size",
    "--zero": "zero",
    "--offload": "offload",
    "--reduce-bucket-size": "reduce_bucket_size",
    "--no-overlap-comm": "no_overlap_comm",
    "--no-gradient-checkpointing": "no_gradient_checkpointing",
    "--train-vision-tower": "train_vision_tower",
    "--train-projector": "train_projector",
    "--fp32": "fp32",
    "--target-tokens": "target_tokens",
}


def _default(attr: str) -> object:
    reference = argparse.ArgumentParser(add_help=False)
    add_arguments(reference)
    return reference.get_default(attr)


def run(args: argparse.Namespace) -> int:
    from rmpl_ds import plan as planner

    if args.recipe:
        from rmpl_ds.config import load_recipe

        conflicting = [flag for flag, attr in _SETUP_FLAGS.items() if getattr(args, attr) != _default(attr)]
        if conflicting:
            raise UserError(
                f"{', '.join(conflicting)}: the recipe describes the setup; change it with overrides instead "
                "(e.g. model.mode=qlora model.max_seq_len=1024 stages.stage1.micro_batch=1)"
            )
        recipe = load_recipe(args.recipe, args.overrides, world_size=args.gpus)
        result = planner.plan_recipe(recipe, args.gpus, gpu_mem_gib=args.gpu_mem_gb, stage=args.stage, loss=args.loss)
    else:
        if args.overrides or args.stage:
            raise UserError("key.path=value overrides and --stage apply to --recipe only")
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
        settings = planner.PlanSettings(
            backbone=args.backbone,
            mode=args.mode,
            gpus=args.gpus if args.gpus is not None else 2,
            gpu_mem_gib=args.gpu_mem_gb,
            lora_rank=args.lora_rank,
            lora_targets=targets,
            lora_dropout=args.lora_dropout,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            zero_stage=args.zero,
            offload=args.offload,
            image_tokens=args.image_tokens,
            image_size=args.image_size,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            train_vision_tower=args.train_vision_tower,
            train_projector=args.train_projector,
            dtype="fp32" if args.fp32 else "bf16",
            loss=args.loss or "target_only",
            target_tokens=args.target_tokens or planner.DEFAULT_TARGET_TOKENS,
            reduce_bucket_size=int(args.reduce_bucket_size or planner.DEFAULT_REDUCE_BUCKET_SIZE),
            overlap_comm=planner.DEFAULT_OVERLAP_COMM and not args.no_overlap_comm,
        )
        result = planner.plan_memory(settings)
    comparison = planner.compare_losses(result) if args.compare_losses else None
    if args.json:
        document = result.to_dict()
        if comparison is not None:
            document["by_loss"] = comparison
        print(json.dumps(document, indent=2))
    else:
        print(result.format_table())
        if comparison is not None:
            print("by loss path (the same settings otherwise):")
            print(planner.format_comparison(comparison, result.settings.loss))
    return 0
