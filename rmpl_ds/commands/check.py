"""Validate a recipe (and its DeepSpeed config) and print what it resolves to; with --deep, also every file the
run will read or write.

Every problem is listed with its key path; the exit code is 2 when there is any. Without --deep only the recipe
itself is checked. --deep runs the checks `rmpl-ds pipeline` runs before it starts (rmpl_ds.preflight): the model
directory, every shard set re-hashed (or, missing, its raw input for the pipeline to build), the M2E2 annotations
and images of the evaluation, room in the output directory for the planned checkpoints, and on a GPU host the
memory planner's verdict. Nothing is created. Overrides are ``key.path=value`` pairs, as for `rmpl-ds train`:

    rmpl-ds check launch/recipes/rmpl_qwen2vl_7b.yaml stages.stage2.lr=2e-5 --gpus 4
    rmpl-ds check launch/recipes/rmpl_qwen2vl_7b.yaml --deep
"""

from __future__ import annotations

import argparse
import json

HELP = "validate a recipe and show its stages and batch arithmetic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    parser.add_argument("--gpus", type=int, default=None, help="world size to check against (default: the recipe's)")
    parser.add_argument("--json", action="store_true", help="print the resolved recipe as JSON")
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also check the model directory, shard sets, evaluation data and output space (nothing is created)",
    )


def run(args: argparse.Namespace) -> int:
    from rmpl_ds.config import batch_plan, load_recipe, to_dict
    from rmpl_ds.ds_config import recipe_ds_config, zero_stage

    recipe = load_recipe(args.recipe, args.overrides, world_size=args.gpus)
    ds_config = recipe_ds_config(recipe.launch)
    world = args.gpus or recipe.launch.world_size
    if args.json:
        print(json.dumps(to_dict(recipe), indent=2))
        return 0
    zero = zero_stage(ds_config)
    print(f"recipe {recipe.name}: {recipe.model.family} ({recipe.model.mode}) from {recipe.model.path}")
    print(f"  world size {world}, ZeRO-{zero} ({recipe.launch.deepspeed_config}), output {recipe.out_dir()}")
    for stage in recipe.stages:
        plan = batch_plan(stage.global_batch, stage.micro_batch, world)
        total = sum(stream.weight for stream in stage.mixture)
        mix = ", ".join(f"{s.name} {s.weight / total:.3f}" for s in stage.mixture)
        print(
            f"  {stage.name}: {stage.steps} steps, lr {stage.lr:g} ({stage.schedule}, warmup {stage.warmup_steps}), "
            f"init from {stage.init_from or 'the base model'}"
        )
        print(
            f"    batch {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.accumulation} "
            f"x world {plan.world_size}; mixture {mix}"
        )
    if not args.deep:
        print("ok (the recipe; --deep also checks the model, shards, evaluation data and output space)")
        return 0
    from rmpl_ds import preflight

    scope = preflight.Scope(
        stages=tuple(stage.name for stage in recipe.stages),
        run_dir=recipe.out_dir(),
        world_size=world,
        build_shards=True,
        evaluate=recipe.evaluation.m2e2 is not None or recipe.evaluation.images is not None,
        gpu_memory_gib=preflight.gpu_memory_gib(),
    )
    preflight.check_or_raise(recipe, scope)
    needed = preflight.planned_bytes(recipe, recipe.stages)
    space = f"; checkpoints and exports need about {needed / preflight.GIB:.1f} GiB" if needed is not None else ""
    print(f"ok: model, shard sets{', evaluation data' if scope.evaluate else ''} and output directory{space}")
    return 0
