"""Recipes: one YAML file describes a whole pipeline (model, sources, ordered stages, launch, logging, eval).

A recipe is loaded into frozen, typed dataclasses. Loading is strict: unknown keys, wrong types and
inconsistent values are all collected and reported at once, each with its key path and the file, e.g.::

    launch/recipes/bad.yaml: 2 problems:
      stages[1].mixture[2].weight: must be > 0, got -1
      stages[0].global_batch: 16 is not divisible by micro_batch 3 x world size 2 (= 6)

Command-line overrides are ``key.path=value`` pairs applied to the YAML before validation. A list element is
addressed by index (``stages[1].lr=3e-5`` or ``stages.1.lr=3e-5``) or, for stages, by name
(``stages.stage2.lr=3e-5``). Values are parsed as YAML scalars (``3e-5``, ``true``, ``[q_proj, v_proj]``).

Paths (:data:`PATH_KEYS`: the model, the sources, the raw inputs, the output directory, the DeepSpeed config, the
hostfile and the evaluation data): a relative path written in a recipe file is relative to **that file's folder**
(so a recipe and its data can move together, and a recipe works from any directory; under ``extends`` each file's
paths are relative to its own folder); a relative path given as an override on the command line is relative to the
current directory, as anything typed in a shell. Both are made absolute when the recipe loads. A DeepSpeed config
given by a bare name (``zero2``, ``zero2_offload.json``) is one of the package's own (rmpl_ds/ds_configs).

Batch arithmetic lives in :func:`batch_plan`: ``global = micro x accumulation x world``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from rmpl_ds.errors import ConfigError, UserError

Task = Literal["t", "i", "r", "EM", "AR", "joint", "ts", "vs", "chat"]
TASKS: tuple[str, ...] = typing.get_args(Task)
# The tasks whose answers evaluation during training generates and scores (rmpl_ds.dev_eval).
GENERATION_TASKS: tuple[str, ...] = ("EM", "AR")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters (the recipe's ``model.lora``, and what ``adapter.load`` takes); ``targets: null`` means
    all of the family's language-model projections (its spec's ``lora_targets``)."""

    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: a registered family, a local HF directory, and how it is trained.

    ``loss``: ``target_only`` (the default) projects only the target positions through the LM head;
    ``full_logits`` computes logits for every position (the reference; same losses and gradients, see
    rmpl_ds.loss). ``max_target_tokens`` bounds the labelled tokens of one example (a longer target loses its
    tail, counted and logged like a ``max_seq_len`` truncation), so the planner's logits term is a bound, not a guess.
    ``init``: ``pretrained`` (the default) reads the weights in ``path``; ``random`` builds ``path``'s config.json with
    random weights (benchmarks of full-size backbones where no weights exist: bench/gpu/); only stages that start
    from the base model (no ``init_from``) may use it.
    """

    family: str
    path: str
    mode: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_vision_tower: bool = False
    train_projector: bool = False
    image_size: int = 512
    max_image_tokens: int | None = None
    max_seq_len: int = 2048
    max_target_tokens: int = 256
    loss: Literal["target_only", "full_logits"] = "target_only"
    gradient_checkpointing: bool = True
    dtype: Literal["bf16", "fp32"] = "bf16"
    init: Literal["pretrained", "random"] = "pretrained"


@dataclass(frozen=True)
class StreamConfig:
    """One stream of a stage's mixture: a source rendered for a task, drawn with a sampling weight.

    ``loss_weight`` scales the stream's loss (the paper weights by sampling ratio only, so it defaults to 1).
    """

    source: str
    task: Task
    weight: float
    loss_weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.source}:{self.task}"


@dataclass(frozen=True)
class PhaseConfig:
    """From optimizer step ``start_step`` on, the mixture weights become ``weights`` (stream name -> weight)."""

    start_step: int
    weights: dict[str, float]


@dataclass(frozen=True)
class StageEvalConfig:
    """Evaluation while a stage trains (rmpl_ds.dev_eval): every ``every`` steps and after the last one, the loss of
    each stream in ``streams`` (default: every stream of the mixture) on up to ``max_items`` held-out records of its
    source (the records of ``splits``, which the stage's ``train_splits`` must leave out), computed like the training
    loss and shared by all ranks. With ``keep_best``, the checkpoint of the step with the lowest ``metric``
    (``loss``: the mean over the streams; ``loss/<stream>``: one stream's) is kept out of the ``keep_last`` rotation
    and the stage exports it. With ``generate``, the items of the EM and AR streams are also answered by greedy
    generation (at most ``max_new_tokens``), parsed and scored strictly (F1 in percent: event types for EM; for AR
    arguments by trigger, role and span, image arguments by role and box at IoU >= ``iou_threshold``); ``metric``
    may then be ``f1`` (the mean over those streams) or ``f1/<stream>`` (higher is better)."""

    every: int = 100
    splits: tuple[str, ...] = ("dev", "val")
    streams: tuple[str, ...] = ()
    max_items: int = 64
    keep_best: bool = False
    metric: str = "loss"
    generate: bool = False
    max_new_tokens: int = 64
    iou_threshold: float = 0.5


@dataclass(frozen=True)
class LossWeightingConfig:
    """How a stage's stream loss weights move during training (rmpl_ds.weighting).

    ``kind: fixed`` (the default) keeps each stream's ``loss_weight``. ``kind: dwa`` is dynamic weight averaging
    (Liu et al. 2019, as X-MTL uses it): every ``window`` optimizer steps each stream's mean loss over the window is
    recorded, and from the third window on stream k's weight is ``loss_weight_k x W_k`` with
    ``W_k = K softmax_k(temperature x L_k(t-1) / L_k(t-2))`` over the K streams (``temperature`` is X-MTL's alpha,
    0.5; the original DWA's 1/T); before two windows exist ``W_k = 1``."""

    kind: Literal["fixed", "dwa"] = "fixed"
    temperature: float = 0.5
    window: int = 20


@dataclass(frozen=True)
class StageConfig:
    """One training stage = one launcher run.

    ``init_from`` is ``null`` (start from the base model) or the name of an earlier stage whose export this
    stage starts from. ``train_splits``: the record splits the stage trains on (``[train]``; empty: every record of
    its shard sets). ``eval``: evaluation during the stage (:class:`StageEvalConfig`), or null. ``loss_weighting``:
    fixed stream loss weights or dynamic weight averaging (:class:`LossWeightingConfig`).
    """

    name: str
    mixture: tuple[StreamConfig, ...]
    steps: int
    lr: float
    init_from: str | None = None
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_batch: int = 16
    micro_batch: int = 1
    seed: int = 42
    checkpoint_every: int = 100
    keep_last: int = 2
    window_tolerance: float = 1.0
    max_bad_steps: int = 5
    export: Literal["merged", "adapter"] = "merged"
    phases: tuple[PhaseConfig, ...] = ()
    train_splits: tuple[str, ...] = ()
    eval: StageEvalConfig | None = None
    loss_weighting: LossWeightingConfig = field(default_factory=LossWeightingConfig)


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how the stage runs: ranks per node, nodes, the DeepSpeed config, data loader workers.

    ``zero_stage`` (0, 1 or 2) overrides the DeepSpeed config's ZeRO stage; ``null`` keeps the file's (2 for
    the package's zero2 config). ZeRO-2 pays where the optimizer states and gradients of the trainable parameters are
    large (full fine-tuning of 7-8B models); for LoRA on two GPUs they are ~2 GiB in all, and ZeRO-0/1 leave out
    the partitioning work (`rmpl-ds plan` says what each stage costs).
    """

    gpus: int = 2
    nodes: int = 1
    deepspeed_config: str = "zero2"
    zero_stage: int | None = None
    num_workers: int = 2
    hostfile: str | None = None

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 1
    console_every: int = 10


@dataclass(frozen=True)
class EvalConfig:
    """M2E2 evaluation after the stages (``m2e2`` is the raw M2E2 directory; images under ``images``)."""

    m2e2: str | None = None
    images: str | None = None
    settings: tuple[Literal["text", "image", "multimedia"], ...] = ("text", "image", "multimedia")
    batch_size: int = 4
    max_new_tokens: int = 128
    iou_threshold: float = 0.5
    limit: int | None = None


@dataclass(frozen=True)
class TasksConfig:
    """How targets are written. ``box_format``: ``native`` (the default) writes image arguments in the grounding
    syntax the backbone was pretrained with (rmpl_ds.grounding); ``plain`` as ``role: [x1,y1,x2,y2]`` on 0-999.
    ``chat_labels``: the ``chat`` task's loss covers every assistant turn (``all``, the default) or the last one
    (``last``); a chat dataset's own boxes are text and never rewritten (rmpl_ds.chat). ``schema_guided``: the EM,
    AR and joint prompts list every event type with its definition and roles (LLaVA-MS-PIT's schema-guided
    prompts; rmpl_ds.tasks), in training and in evaluation alike."""

    box_format: Literal["native", "plain"] = "native"
    chat_labels: Literal["all", "last"] = "all"
    schema_guided: bool = False


@dataclass(frozen=True)
class RawSource:
    """Where `rmpl-ds pipeline` builds a missing shard set from: a converter (``ace``, ``imsitu``, ``swig``, ``mnre``,
    ``m2e2``, ``chat``, ``pairs``, ``schema``), its raw input and, for image sources, the image directory (``chat``:
    where relative image paths resolve, else the input's folder).

    ``converter: pseudo`` is X-MTL's pseudo-labelling (rmpl_ds.pseudo): ``input`` is a shard set of unlabeled
    image-caption pairs (another source's directory, built first when it has a ``raw`` entry), ``label_with`` the
    stage whose export labels them, ``threshold`` the confidence both answers must reach. The pipeline builds the
    set after that stage and before the first stage that reads it."""

    converter: Literal["ace", "imsitu", "swig", "mnre", "m2e2", "chat", "pairs", "schema", "pseudo"]
    input: str
    images: str | None = None
    shard_size: int = 1000
    label_with: str | None = None
    threshold: float = 0.8


@dataclass(frozen=True)
class Recipe:
    """A whole pipeline. ``sources`` maps a source name to its shard directory; ``raw`` (optional) says how to
    build a source's shards when they are missing; ``description`` (optional) heads the pipeline's report."""

    name: str
    model: ModelConfig
    sources: dict[str, str]
    stages: tuple[StageConfig, ...]
    description: str | None = None
    raw: dict[str, RawSource] = field(default_factory=dict)
    output_dir: str = "runs/{name}"
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UserError(f"recipe {self.name!r} has no stage {name!r}; its stages are {[s.name for s in self.stages]}")

    def out_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def source_at(self, directory: str | os.PathLike[str]) -> str | None:
        """The source whose shard directory is ``directory`` (paths compared normalized), or None."""
        wanted = os.path.normpath(directory)
        return next((name for name, path in self.sources.items() if os.path.normpath(path) == wanted), None)


# --------------------------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: ``global_batch = micro_batch x accumulation x world_size``."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int


def batch_plan(global_batch: int, micro_batch: int, world_size: int) -> BatchPlan:
    """The one place where batch sizes are related; raises UserError for an impossible combination."""
    problems = _batch_problems(global_batch, micro_batch, world_size)
    if problems:
        raise UserError(f"global batch {problems[0]}")
    return BatchPlan(global_batch, micro_batch, world_size, global_batch // (micro_batch * world_size))


def _batch_problems(global_batch: int, micro_batch: int, world_size: int) -> list[str]:
    if global_batch < 1 or micro_batch < 1 or world_size < 1:
        return [f"global batch {global_batch}, micro batch {micro_batch} and world size {world_size} must all be >= 1"]
    per_step = micro_batch * world_size
    if global_batch % per_step:
        per_rank = global_batch // world_size if global_batch % world_size == 0 else 0
        hint = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        fix = f"micro batches that work: {hint}" if hint else f"make it a multiple of world size {world_size}"
        return [
            f"{global_batch} is not divisible by micro batch {micro_batch} x world size {world_size} "
            f"(= {per_step}); {fix}"
        ]
    return []


# --------------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: Sequence[str] = (), world_size: int | None = None) -> Recipe:
    """Load, override and validate a recipe; every problem is reported in one ConfigError.

    Args:
        path: the YAML file; the relative paths in it are relative to its folder (module docstring).
        overrides: ``key.path=value`` strings applied before validation (relative paths: the current directory).
        world_size: the number of ranks the run will use, when known (defaults to launch.gpus x launch.nodes);
            the batch arithmetic of every stage is checked against it.
    """
    path = Path(path)
    source = str(path)
    raw = _read_yaml(path)
    return recipe_from_dict(raw, source=source, overrides=overrides, world_size=world_size)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> Any:
    """Parse a recipe file, resolving ``extends: other.yaml`` (a path relative to this file) recursively.

    The child's keys are deep-merged over the parent's: mappings merge, anything else (lists included)
    replaces. ``extends`` is resolved before validation, so key paths in errors refer to the merged recipe.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{source}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: cannot read recipe: {error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{source}{where}: invalid YAML: {problem}") from None
    if isinstance(raw, dict):
        resolve_paths(raw, Path(os.path.abspath(path.parent)))
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    parent_name = raw.pop("extends")
    if not isinstance(parent_name, str):
        raise ConfigError(source, [f"extends: expected a file name, got {_type_name(parent_name)}"])
    parent = (path.parent / parent_name).resolve()
    if parent in chain or parent == path.resolve():
        raise ConfigError(source, [f"extends: {parent_name!r} makes a cycle ({' -> '.join(map(str, chain))})"])
    if not parent.is_file():
        raise ConfigError(source, [f"extends: {parent_name!r} not found (looked for {parent})"])
    base = _read_yaml(parent, (*chain, path.resolve()))
    if not isinstance(base, dict):
        raise ConfigError(str(parent), [f"<top>: expected a mapping, got {_type_name(base)}"])
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_from_dict(
    raw: Any, *, source: str = "<recipe>", overrides: Sequence[str] = (), world_size: int | None = None
) -> Recipe:
    """Validate an already-parsed recipe mapping (see :func:`load_recipe`)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"<top>: expected a mapping, got {_type_name(raw)}"])
    raw = apply_overrides(raw, overrides, source=source)
    problems = Problems()
    recipe = _load(Recipe, raw, "", problems)
    validate(recipe, world_size=world_size, problems=problems)
    if problems:
        raise ConfigError(source, problems.messages())
    return recipe


class Problems:
    """Collects ``key.path: message`` problems.

    Type problems found while loading mark their key as bad; a later cross-field check on a bad key (or one
    below it, or one that depends on it) is skipped, so each problem is reported once and only real ones.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._bad: set[str] = set()

    def type_error(self, key: str, message: str) -> None:
        self._items.append((key, message))
        self._bad.add(key)

    def add(self, key: str, message: str, *, depends: tuple[str, ...] = ()) -> None:
        if not any(self.is_bad(k) for k in (key, *depends)):
            self._items.append((key, message))

    def is_bad(self, key: str) -> bool:
        return any(key == bad or key.startswith((bad + ".", bad + "[")) for bad in self._bad)

    def messages(self) -> list[str]:
        return [f"{key or '<top>'}: {message}" if key else message for key, message in self._items]

    def __bool__(self) -> bool:
        return bool(self._items)


def validate(recipe: Recipe, world_size: int | None = None, problems: Problems | None = None) -> list[str]:
    """Cross-field rules; returns every problem as ``key.path: message`` (and adds them to ``problems``)."""
    problems = problems if problems is not None else Problems()
    add = problems.add
    model, launch, evaluation = recipe.model, recipe.launch, recipe.evaluation
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(recipe.name)):
        add("name", f"must be non-empty letters, digits, '.', '_' or '-', got {recipe.name!r}")
    _validate_family(model, problems)
    _positive(problems, "model.lora.rank", model.lora.rank)
    _positive(problems, "model.lora.alpha", model.lora.alpha)
    if not 0 <= model.lora.dropout < 1:
        add("model.lora.dropout", f"must be in [0, 1), got {model.lora.dropout}")
    _positive(problems, "model.image_size", model.image_size)
    _positive(problems, "model.max_seq_len", model.max_seq_len)
    _positive(problems, "model.max_target_tokens", model.max_target_tokens)
    if model.max_target_tokens >= model.max_seq_len > 0:
        add(
            "model.max_target_tokens",
            f"must be < max_seq_len ({model.max_seq_len}): the prompt needs room too, got {model.max_target_tokens}",
            depends=("model.max_seq_len",),
        )
    if model.max_image_tokens is not None:
        _positive(problems, "model.max_image_tokens", model.max_image_tokens)
    if model.mode == "qlora" and model.dtype != "bf16":
        add("model.dtype", "qlora computes in bf16; set dtype: bf16", depends=("model.mode",))
    if not recipe.sources:
        add("sources", "at least one source is required")
    for name, raw in recipe.raw.items():
        if name not in recipe.sources:
            add(f"raw.{name}", f"not a source of this recipe ({sorted(recipe.sources)})", depends=("sources",))
        _positive(problems, f"raw.{name}.shard_size", raw.shard_size)
        _validate_pseudo_source(recipe, name, raw, problems)
    _positive(problems, "launch.gpus", launch.gpus)
    if launch.zero_stage is not None and launch.zero_stage not in (0, 1, 2):
        add("launch.zero_stage", f"must be 0, 1, 2 or null (the DeepSpeed config's), got {launch.zero_stage}")
    _positive(problems, "launch.nodes", launch.nodes)
    if launch.num_workers < 0:
        add("launch.num_workers", f"must be >= 0, got {launch.num_workers}")
    _positive(problems, "logging.log_every", recipe.logging.log_every)
    _positive(problems, "logging.console_every", recipe.logging.console_every)
    _positive(problems, "evaluation.batch_size", evaluation.batch_size)
    _positive(problems, "evaluation.max_new_tokens", evaluation.max_new_tokens)
    if not 0 < evaluation.iou_threshold <= 1:
        add("evaluation.iou_threshold", f"must be in (0, 1], got {evaluation.iou_threshold}")

    if world_size is not None:
        world, world_keys = world_size, ()
    else:
        world, world_keys = launch.world_size, ("launch.gpus", "launch.nodes")
    if not recipe.stages:
        add("stages", "at least one stage is required")
    earlier: dict[str, int] = {}
    for index, stage in enumerate(recipe.stages):
        key = f"stages[{index}]"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(stage.name)):
            add(f"{key}.name", f"must be non-empty letters, digits, '.', '_' or '-', got {stage.name!r}")
        elif stage.name in earlier:
            add(f"{key}.name", f"duplicate stage name {stage.name!r} (also stages[{earlier[stage.name]}])")
        if stage.init_from is not None and stage.init_from not in earlier:
            later = [s.name for s in recipe.stages[index:]]
            why = "is this stage or a later one" if stage.init_from in later else "is not a stage of this recipe"
            add(f"{key}.init_from", f"{stage.init_from!r} {why}; it must name an earlier stage or be null")
        if stage.init_from is not None and recipe.model.init == "random":
            add(
                f"{key}.init_from",
                "model.init is random (a benchmark of the base architecture): a stage that starts from an export "
                "needs model.init: pretrained",
                depends=("model.init",),
            )
        earlier.setdefault(stage.name, index)
        _validate_stage(stage, key, recipe, world, world_keys, problems)
    return problems.messages()


def _validate_pseudo_source(recipe: Recipe, name: str, raw: RawSource, problems: Problems) -> None:
    key = f"raw.{name}"
    if raw.converter != "pseudo":
        if raw.label_with is not None:
            problems.add(f"{key}.label_with", "only a pseudo-labelled source (converter: pseudo) has a labelling stage")
        return
    if not 0 < raw.threshold <= 1:
        problems.add(f"{key}.threshold", f"must be in (0, 1], got {_fmt(raw.threshold)}")
    names = [stage.name for stage in recipe.stages]
    if raw.label_with not in names:
        problems.add(f"{key}.label_with", f"must name the stage whose export labels the pairs, one of {names}")
        return
    readers = [i for i, stage in enumerate(recipe.stages) if any(s.source == name for s in stage.mixture)]
    if readers and readers[0] <= names.index(raw.label_with):
        problems.add(
            f"{key}.label_with",
            f"stage {raw.label_with!r} must run before stage {names[readers[0]]!r}, the first that reads {name!r}",
        )


def _validate_stage_eval(
    stage: StageConfig, evaluation: StageEvalConfig, key: str, streams: dict[str, int], problems: Problems
) -> None:
    add, ekey = problems.add, f"{key}.eval"
    _positive(problems, f"{ekey}.every", evaluation.every)
    _positive(problems, f"{ekey}.max_items", evaluation.max_items)
    if not evaluation.splits:
        add(f"{ekey}.splits", "at least one split is required (the held-out records, e.g. [dev, val])")
    overlap = sorted(set(evaluation.splits) & set(stage.train_splits))
    if overlap:
        add(f"{ekey}.splits", f"{overlap} are trained on too (train_splits); held-out records must not be")
    elif not stage.train_splits:
        add(
            f"{key}.train_splits",
            f"is empty, so the stage trains on every record, the eval splits {list(evaluation.splits)} included; "
            "set train_splits: [train]",
        )
    for name in evaluation.streams:
        if name not in streams:
            add(f"{ekey}.streams", f"{name!r} is not a stream of this stage ({sorted(streams)})")
    _positive(problems, f"{ekey}.max_new_tokens", evaluation.max_new_tokens)
    if not 0 < evaluation.iou_threshold <= 1:
        add(f"{ekey}.iou_threshold", f"must be in (0, 1], got {evaluation.iou_threshold}")
    chosen = evaluation.streams or tuple(streams)
    generated = [name for name in chosen if name.rsplit(":", 1)[-1] in GENERATION_TASKS] if evaluation.generate else []
    metrics = ["loss", *(f"loss/{name}" for name in chosen)]
    metrics += ["f1", *(f"f1/{name}" for name in generated)] if generated else []
    if evaluation.metric not in metrics:
        add(f"{ekey}.metric", f"must be one of {metrics}, got {evaluation.metric!r}")
    if evaluation.keep_best and evaluation.every % stage.checkpoint_every:
        add(
            f"{ekey}.every",
            f"keep_best keeps an evaluated step's checkpoint: every ({evaluation.every}) must be a multiple of "
            f"checkpoint_every ({stage.checkpoint_every})",
            depends=(f"{key}.checkpoint_every",),
        )


def _validate_family(model: ModelConfig, problems: Problems) -> None:
    """The family is a registered one, and what the recipe says about it fits its spec (cheap: specs need no
    torch)."""
    from rmpl_ds.backbones import FAMILIES, get_spec

    if model.family not in FAMILIES:
        problems.add("model.family", f"must be one of {', '.join(FAMILIES)}; got {model.family!r}")
        return
    spec = get_spec(model.family)
    if model.mode != "full":
        for message in spec.lora_target_problems(model.lora.targets):
            problems.add("model.lora.targets", message, depends=("model.family",))


def _validate_stage(
    stage: StageConfig, key: str, recipe: Recipe, world: int, world_keys: tuple[str, ...], problems: Problems
) -> None:
    add = problems.add
    if not stage.mixture:
        add(f"{key}.mixture", "at least one stream is required")
    streams: dict[str, int] = {}
    for j, stream in enumerate(stage.mixture):
        skey = f"{key}.mixture[{j}]"
        if stream.source not in recipe.sources:
            add(f"{skey}.source", f"{stream.source!r} is not in sources {sorted(recipe.sources)}", depends=("sources",))
        if not stream.weight > 0:
            add(f"{skey}.weight", f"must be > 0, got {_fmt(stream.weight)}")
        if not stream.loss_weight >= 0:
            add(f"{skey}.loss_weight", f"must be >= 0, got {_fmt(stream.loss_weight)}")
        if stream.name in streams:
            add(skey, f"duplicate stream {stream.name!r} (also {key}.mixture[{streams[stream.name]}])")
        raw = recipe.raw.get(stream.source)
        if raw is not None and (stream.task == "chat") != (raw.converter == "chat"):
            # The shard sets are checked the same way before training (rmpl_ds.chat.stream_problems).
            why = (
                f"task chat trains on conversations; raw.{stream.source}.converter is {raw.converter}"
                if stream.task == "chat"
                else f"raw.{stream.source}.converter is chat: its conversations train with task chat"
            )
            add(f"{skey}.task", why, depends=(f"raw.{stream.source}",))
        streams.setdefault(stream.name, j)
    _positive(problems, f"{key}.steps", stage.steps)
    _positive(problems, f"{key}.lr", stage.lr)
    if not 0 <= stage.warmup_steps <= max(stage.steps, 0):
        add(f"{key}.warmup_steps", f"must be in [0, steps={stage.steps}], got {stage.warmup_steps}")
    if not 0 <= stage.min_lr_ratio <= 1:
        add(f"{key}.min_lr_ratio", f"must be in [0, 1], got {stage.min_lr_ratio}")
    if not stage.weight_decay >= 0:
        add(f"{key}.weight_decay", f"must be >= 0, got {stage.weight_decay}")
    if not stage.grad_clip >= 0:
        add(f"{key}.grad_clip", f"must be >= 0 (0 disables clipping), got {stage.grad_clip}")
    for name in ("checkpoint_every", "keep_last", "max_bad_steps", "window_tolerance"):
        _positive(problems, f"{key}.{name}", getattr(stage, name))
    if stage.seed < 0:
        add(f"{key}.seed", f"must be >= 0, got {stage.seed}")
    if stage.eval is not None:
        _validate_stage_eval(stage, stage.eval, key, streams, problems)
    if stage.loss_weighting.kind == "dwa":
        _positive(problems, f"{key}.loss_weighting.temperature", stage.loss_weighting.temperature)
        _positive(problems, f"{key}.loss_weighting.window", stage.loss_weighting.window)
    for message in _batch_problems(stage.global_batch, stage.micro_batch, world):
        add(f"{key}.global_batch", message, depends=(f"{key}.micro_batch", *world_keys))
    previous = -1
    for j, phase in enumerate(stage.phases):
        pkey = f"{key}.phases[{j}]"
        if not (0 <= phase.start_step < stage.steps and phase.start_step > previous):
            add(f"{pkey}.start_step", f"must increase and lie in [0, steps={stage.steps}), got {phase.start_step}")
        previous = phase.start_step
        for stream_name, weight in phase.weights.items():
            if stream_name not in streams:
                add(f"{pkey}.weights.{stream_name}", f"not a stream of this stage ({sorted(streams)})")
            elif not weight >= 0:
                add(f"{pkey}.weights.{stream_name}", f"must be >= 0, got {weight}")
        if phase.weights and not any(w > 0 for w in phase.weights.values()):
            add(f"{pkey}.weights", "at least one weight must be > 0")


def _positive(problems: Problems, key: str, value: int | float) -> None:
    if not value > 0:
        problems.add(key, f"must be > 0, got {_fmt(value)}")


def _fmt(value: Any) -> str:
    """Numbers as a person wrote them: -1.0 -> -1, 1e-05 -> 1e-05."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------------- overrides


_INDEX = re.compile(r"\[(\d+)\]")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "<recipe>") -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` override applied (see the module docstring)."""
    if not overrides:
        return raw
    data = json.loads(json.dumps(raw, default=str))  # a deep copy the caller's mapping never sees
    problems = []
    for override in overrides:
        if "=" not in override:
            problems.append(f"override {override!r}: expected key.path=value")
            continue
        dotted, _, text = override.partition("=")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        try:
            parts = _split_path(dotted.strip())
            if isinstance(value, str) and is_path_key(parts):
                value = resolve_path(value, Path.cwd(), by_name=parts == ["launch", "deepspeed_config"])
            _set_path(data, parts, value)
        except (KeyError, IndexError, TypeError) as error:
            problems.append(f"override {override!r}: {error.args[0] if error.args else error}")
    if problems:
        raise ConfigError(source, problems)
    return data


# Keys whose values are paths ("*": any key of that mapping); see the module docstring.
PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("model", "path"),
    ("output_dir",),
    ("launch", "deepspeed_config"),
    ("launch", "hostfile"),
    ("evaluation", "m2e2"),
    ("evaluation", "images"),
    ("sources", "*"),
    ("raw", "*", "input"),
    ("raw", "*", "images"),
)


def is_path_key(parts: Sequence[str | int]) -> bool:
    """Whether a key path (``["sources", "ace"]``) names a path value."""
    return any(
        len(parts) == len(keys) and all(key in ("*", part) for key, part in zip(keys, parts, strict=True))
        for keys in PATH_KEYS
    )


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make every relative path of a parsed recipe file (:data:`PATH_KEYS`) absolute against ``base``, in place."""

    def visit(node: Any, keys: tuple[str, ...], done: tuple[str, ...]) -> None:
        if not isinstance(node, dict) or not keys:
            return
        head, rest = keys[0], keys[1:]
        for key in list(node) if head == "*" else [head] if head in node else []:
            if rest:
                visit(node[key], rest, (*done, head))
            elif isinstance(node[key], str):
                by_name = (*done, head) == ("launch", "deepspeed_config")
                node[key] = resolve_path(node[key], base, by_name=by_name)

    for keys in PATH_KEYS:
        visit(raw, keys, ())
    return raw


def resolve_path(value: str, base: Path, *, by_name: bool = False) -> str:
    """``value`` as an absolute path against ``base`` (``~`` expanded); with ``by_name``, a bare file name (no
    directory part: one of the package's DeepSpeed configs) is kept as it is."""
    if not value or (by_name and "/" not in value and os.sep not in value):
        return value
    expanded = Path(value).expanduser()
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def _split_path(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in dotted.split("."):
        name = _INDEX.split(piece)
        if name[0]:
            parts.append(int(name[0]) if name[0].isdigit() else name[0])
        parts += [int(i) for i in name[1::2]]
    if not parts:
        raise KeyError("empty key path")
    return parts


def _set_path(data: Any, parts: list[str | int], value: Any) -> None:
    node = data
    walked = ""
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if isinstance(node, list):
            if isinstance(part, str):  # a list of named items (stages) addressed by name
                matches = [i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
                if not matches:
                    raise KeyError(f"{walked or '<top>'} has no item named {part!r}")
                part = matches[0]
            if not 0 <= part < len(node):
                raise IndexError(f"{walked or '<top>'}[{part}] is out of range (length {len(node)})")
            walked += f"[{part}]"
        elif isinstance(node, dict):
            if isinstance(part, int):
                part = str(part)
            walked += f".{part}" if walked else part
        else:
            raise TypeError(f"{walked} is a {_type_name(node)}, not a mapping or list")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


# ------------------------------------------------------------------------------------------ typed construction


def _type_name(value: Any) -> str:
    return {type(None): "null", dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _load(hint: Any, value: Any, key: str, problems: Problems) -> Any:
    """Build ``hint`` from YAML data.

    Every mismatch is recorded as a type problem at its key path and replaced by a placeholder of the right
    type, so loading always finishes and the cross-field checks still run on everything that was valid.
    """
    where = key or "<top>"
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            problems.type_error(key, f"expected a mapping, got {_type_name(value)}")
            value = {}
        fields = {f.name: f for f in dataclasses.fields(hint)}
        hints = typing.get_type_hints(hint)
        for unknown in sorted(set(value) - set(fields), key=str):
            problems.type_error(_join(key, unknown), f"unknown key{_close_match(str(unknown), fields)}")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _load(hints[name], value[name], _join(key, name), problems)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.type_error(_join(key, name), "required key is missing")
                kwargs[name] = _placeholder(hints[name])
        return hint(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _load(inner, value, key, problems)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            problems.type_error(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
            return choices[0]
        return value
    if origin is tuple:
        if not isinstance(value, list):
            problems.type_error(key, f"expected a list, got {_type_name(value)}")
            return ()
        (inner, _) = typing.get_args(hint)
        return tuple(_load(inner, item, f"{where}[{i}]", problems) for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            problems.type_error(key, f"expected a mapping, got {_type_name(value)}")
            return {}
        _, inner = typing.get_args(hint)
        return {str(k): _load(inner, v, _join(key, k), problems) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.type_error(key, f"expected true or false, got {value!r}")
        return False
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.type_error(key, f"expected an integer, got {value!r}")
        return 0
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string; accept it when it is a number
            try:
                return float(value)
            except ValueError:
                pass
        problems.type_error(key, f"expected a number, got {value!r}")
        return 0.0
    if hint is str:
        if isinstance(value, str):
            return value
        problems.type_error(key, f"expected a string, got {_type_name(value)} {value!r}")
        return ""
    raise TypeError(f"unsupported recipe field type {hint!r} at {where}")  # a bug in this module, not user input


def _placeholder(hint: Any) -> Any:
    """A value of the right type for a missing required field (never reported: its key is already bad)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _load(hint, {}, "", Problems())
    if origin is Literal:
        return typing.get_args(hint)[0]
    if origin is tuple:
        return ()
    if origin is dict:
        return {}
    return {int: 0, float: 0.0, str: "", bool: False}.get(hint)


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _close_match(name: str, fields: dict[str, Any]) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(fields), n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (known keys: {', '.join(fields)})"


# ------------------------------------------------------------------------------------------------- utilities


def to_dict(obj: Any) -> Any:
    """A recipe (or any part of it) as plain YAML/JSON data, tuples as lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(item) for item in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# Options added after checkpoints and exports were first written, with their defaults: at the default they are left
# out of what is fingerprinted (rmpl_ds.train.stage_fingerprint, rmpl_ds.handoff.lineage_fingerprint), so that the
# checkpoints and exports made before they existed still resume and hand off.
LATER_DEFAULTS: dict[str, Any] = {
    "loss_weighting": to_dict(LossWeightingConfig()),  # StageConfig
    "schema_guided": TasksConfig.schema_guided,  # TasksConfig
}


def fingerprinted(obj: Any) -> dict[str, Any]:
    """A stage's or the tasks section's settings as :func:`fingerprint` hashes them: :func:`to_dict` without the
    options of :data:`LATER_DEFAULTS` that are at their defaults."""
    return {k: v for k, v in to_dict(obj).items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of a recipe or a part of it (e.g. one stage)."""
    canonical = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
