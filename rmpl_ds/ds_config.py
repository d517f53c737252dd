"""DeepSpeed JSON configs: load, check, and fill the values the recipe owns.

The package's files in rmpl_ds/ds_configs/ (``zero2``, ``zero2_offload``; a recipe names one by name or gives a
path to its own) hold what is about the hardware (ZeRO stage, buckets, offload); the values the
recipe owns are ``"auto"`` and :func:`fill` replaces them from one stage's batch plan and hyperparameters,
so no hyperparameter lives in two places. Buckets are 5e7 elements (100 MB in bf16) rather than DeepSpeed's
5e8 defaults, which hold about 1 GB each on a 24 GB card.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from rmpl_ds.config import BatchPlan, LaunchConfig, StageConfig
from rmpl_ds.errors import ConfigError, UserError

# Keys the recipe owns: each must be "auto" (or absent) in a config file.
RECIPE_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
)
# The optimizer and scheduler are built by the engine from the recipe (torch AdamW + warmup/cosine), so a
# config that names its own would silently win over the recipe.
FORBIDDEN = ("optimizer", "scheduler", "fp16.enabled")
SUPPORTED_STAGES = (0, 1, 2)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read and check a DeepSpeed config: a file, or one of the package's by name (:func:`packaged_config`); every
    problem is reported in one ConfigError."""
    path = packaged_config(str(path)) if _is_name(str(path)) else Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    problems = check_ds_config(config)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def packaged_config(name: str) -> Path:
    """One of the package's DeepSpeed configs (rmpl_ds/ds_configs) by name: ``zero2`` or ``zero2.json``.

    Raises:
        UserError: no such config; the message lists the ones there are.
    """
    folder = Path(str(resources.files("rmpl_ds").joinpath("ds_configs")))
    path = folder / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
        raise UserError(f"launch.deepspeed_config: {name!r} is not one of the package's DeepSpeed configs ({known})")
    return path


def _is_name(value: str) -> bool:
    return "/" not in value and os.sep not in value


def check_ds_config(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return ["<top>: expected a JSON object"]
    problems = []
    for dotted in RECIPE_OWNED:
        value = _get(config, dotted)
        if value not in (None, "auto"):
            problems.append(f'{dotted}: the recipe owns this value; set it to "auto", got {value!r}')
    problems += [f"{key}: not allowed here (the recipe configures it)" for key in FORBIDDEN if _get(config, key)]
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [*problems, "zero_optimization: expected an object"]
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        problems.append(
            f"zero_optimization.stage: {stage!r} is not supported; use 2 (ZeRO-3 shards the frozen 4-bit base "
            "weights, which bitsandbytes QLoRA cannot do, and is not needed for LoRA on 24 GB cards)"
        )
    for bucket in ("reduce_bucket_size", "allgather_bucket_size"):
        value = zero.get(bucket)
        if value is not None and not (isinstance(value, int | float) and value > 0):
            problems.append(f"zero_optimization.{bucket}: must be a positive number, got {value!r}")
    offload = zero.get("offload_optimizer")
    if offload is not None and (not isinstance(offload, dict) or offload.get("device") not in ("cpu", "none")):
        problems.append('zero_optimization.offload_optimizer.device: must be "cpu" or "none"')
    return problems


def fill(
    config: dict[str, Any], stage: StageConfig, plan: BatchPlan, *, bf16: bool, trainable_params: int | None = None
) -> dict[str, Any]:
    """A copy of ``config`` with every recipe-owned value set from ``stage`` and its batch ``plan``.

    With ``trainable_params``, ZeRO's reduce bucket is capped at that many elements (see :func:`bucket_elements`).
    """
    filled = json.loads(json.dumps(config))
    filled["train_batch_size"] = plan.global_batch
    filled["train_micro_batch_size_per_gpu"] = plan.micro_batch
    filled["gradient_accumulation_steps"] = plan.accumulation
    filled["gradient_clipping"] = stage.grad_clip
    filled.setdefault("bf16", {})["enabled"] = bf16
    zero = filled.get("zero_optimization")
    if trainable_params is not None and isinstance(zero, dict) and zero.get("stage", 0) in (1, 2):
        zero["reduce_bucket_size"] = bucket_elements(zero.get("reduce_bucket_size", DEEPSPEED_BUCKET), trainable_params)
    return filled


# DeepSpeed's own reduce_bucket_size when a config leaves it out (deepspeed/runtime/zero/config.py).
DEEPSPEED_BUCKET = 500_000_000


def bucket_elements(configured: float, trainable_params: int) -> int:
    """ZeRO's reduce bucket for a model with ``trainable_params`` trainable elements: the configured size, but never
    more than the gradients it can ever hold. DeepSpeed allocates the bucket (two with ``overlap_comm``) afresh at
    every backward, whatever the model: 5e7 bf16 elements are 2 x 100 MB per micro-step for a LoRA or test model
    with a few million trainable parameters (14 % of a CPU step in a profile). At 7-8B scale (161 M LoRA
    parameters at r=64) the configured 5e7 stays."""
    return int(max(1, min(int(configured), trainable_params)))


def recipe_ds_config(launch: LaunchConfig) -> dict[str, Any]:
    """The recipe's DeepSpeed config: ``launch.deepspeed_config`` checked, with ``launch.zero_stage`` applied."""
    config = load_ds_config(launch.deepspeed_config)
    if launch.zero_stage is not None:
        config = {**config, "zero_optimization": {**config.get("zero_optimization", {}), "stage": launch.zero_stage}}
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
