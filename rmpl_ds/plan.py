"""Memory planner: what one GPU holds at the peak of a training step, and whether it fits.

:func:`plan_memory` is a pure function of a backbone config and :class:`PlanSettings`; :func:`plan_recipe` maps
a recipe (its model, its most demanding stage and its DeepSpeed config) onto settings; :func:`check_fits` is what
`rmpl-ds train` calls before it starts. The physics below is the one in ``notes/MEMORY_AND_SPEED.md`` §3 (the ZeRO
paper, DeepSpeed's ``stage_1_and_2.py`` and HF's loss code); every constant names its source.

Conventions: GiB = 2^30 bytes. ``e`` = bytes per element of the compute dtype (2 for bf16, 4 for fp32). ``N`` =
data-parallel GPUs. ``T`` = tokens per micro-batch = seq_len x micro_batch (image tokens included). ``P_t`` = the
trainable parameters (LoRA adapters plus any base modules trained in place), ``P_lora`` = the adapters alone.

Parameters
    Counted exactly by instantiating the config on the meta device (``AutoModelForImageTextToText.from_config``
    under ``torch.device("meta")``; no memory, ~1 s, cached per config): 8,291,375,616 / 8,767,123,696 /
    8,528,318,464 for Qwen2-VL-7B / Qwen3-VL-8B / InternVL3.5-8B. "language" is ``model.language_model`` plus
    ``lm_head``; "vision" is the rest (the vision tower and its projector/mergers). LoRA adds ``r x (in + out)`` for
    every ``nn.Linear`` of the language model whose name ends in a target (default q/k/v/o/gate/up/down_proj, never
    lm_head), summed over the real module shapes: 161.5 M (Qwen2-VL-7B) and 174.6 M (the 8B models) at r=64.

Model states per GPU (ZeRO-2, bf16 with fp32 master weights, torch AdamW)
    weights            2 B x every base parameter, replicated: ZeRO-2 partitions gradients and optimizer states,
                       never parameters. QLoRA stores the weight of every frozen ``nn.Linear`` except lm_head in NF4
                       with double quantization, 4.127 bits = 0.516 B per parameter (QLoRA paper: 0.127 bits of
                       quantization constants per parameter); biases, norms, embeddings, lm_head and convolutions
                       stay bf16. With fp32 compute everything is 4 B.
    adapter weights    e x P_lora (DeepSpeed casts the whole module to the compute dtype).
    gradients          (e + 4) x P_t / N: the compute-dtype gradient partition a rank owns after reduce-scatter, plus
                       the fp32 copy the optimizer step makes of it. ZeRO-1: e x P_t (unpartitioned) + 4 x P_t / N.
                       ZeRO-0 (DeepSpeed's bf16 data-parallel optimizer): (e + 4) x P_t, nothing partitioned.
    optimizer states   12 x P_t / N: fp32 master weights (4) + Adam momentum and variance (8); ZeRO-0: 12 x P_t.
    Full fine-tuning therefore costs 2P + 18P/N, term for term DeepSpeed's own
    ``estimate_zero2_model_states_mem_needs(P, cpu_offload=False)`` ("2 = params_16bit, 18 = 2_grads_16bit +
    4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit"); tests/test_plan.py asserts the agreement. The ZeRO
    paper's 2P + 14P/N leaves out the fp32 gradient copy; the planner follows DeepSpeed, whose code allocates it
    (conservative: that copy lives only during the optimizer step, when activations are already freed). With
    ``offload_optimizer`` the gradients and optimizer states live in host memory (GPU: the weights alone, again as
    DeepSpeed's estimator says), plus one staging buffer of the largest trainable tensor (``stage_1_and_2.py``,
    ``temp_grad_buffer_for_gpu_offload``).

Communication buckets
    With ``contiguous_gradients`` (DeepSpeed's default) each backward allocates a reduce buffer of
    ``reduce_bucket_size`` elements in the compute dtype (capped at the trainable parameters by
    ``rmpl_ds.ds_config.fill``; ZeRO-0 has none), and a second one when ``overlap_comm`` is on
    (``stage_1_and_2.py``, ``setup_buckets``): ds_configs/zero2.json's 5e7 with overlap is 0.19 GiB, DeepSpeed's
    default 5e8 is 0.93 GiB for nothing under LoRA. The all-gather after the step writes in place into the flat
    parameter buffer (``all_gather_into_tensor``), so ``allgather_bucket_size`` costs no memory.

Activations with gradient checkpointing (per decoder layer, HF's default), bytes per token (§3.2)
    layer boundaries   L x h x e: every layer's input, kept until backward reaches the layer.
    recomputed layer   one layer's saved tensors during its recompute: attention ``6h + 2 kv_dim`` (norm input, its
                       fp32 upcast, normed input, q, k, v, attention output) + MLP ``4h + 4I`` (gate, up, SiLU, product,
                       norm buffers) elements of e bytes, plus, when lora_dropout > 0, the dropped-out input PEFT keeps
                       for every adapted linear (the sum of their in_features per layer, ``6h + I`` for all seven).
                       Without checkpointing all L layers keep this set (it includes the boundary).
    logits             V x 10 B per projected position: bf16 logits (2 B), their fp32 upcast (4 B) and the fp32
                       log-softmax cross-entropy keeps for backward (4 B); the backward's fp32 gradient takes the
                       upcast's place. V = 152,064 makes it 1.45 MiB per position, the largest activation term when
                       every position is projected. ``loss`` says which positions are:
                       ``target_only`` (the package's default, rmpl_ds.loss) projects the target positions only, at
                       most ``target_tokens`` (the recipe's ``model.max_target_tokens``, enforced when encoding) per
                       sample: min(seq_len, target_tokens) x micro_batch positions.
                       ``full_logits`` (HF's forward) projects all T positions.
                       ``fused`` models a fused linear + cross-entropy (Liger), which computes the logits in chunks of
                       ``next_pow2(ceil(T / ceil(V / h)))`` tokens (fp32 logits + gradient, 8 B x V each) plus an
                       fp32 [T, h] input gradient.
    vision tower       frozen: it keeps nothing for backward (no input-gradient hook reaches it, so autograd
                       records no graph there; rmpl_ds.backbones.loading); its forward transient is counted
                       (conservatively, it precedes the LLM's peak): one attention score matrix ``heads x S^2 x e``
                       for the longest sequence S (eager/SDPA-math; FlashAttention-2 avoids it) plus the tower's
                       input and output hidden states for every image. Trained: the same checkpointing rule as the
                       LLM with a ViT layer of ``8w + 2m`` elements per patch (MHA q/k/v/out + norms, fc1 +
                       activation).
    qlora dequant      the largest quantized matrix dequantized to bf16 just in time.
    These are estimates, good to about +-30 % (§3.2); LoRA's r-wide intermediates are negligible.

Fixed costs
    CUDA context + cuBLAS workspace + NCCL buffers: 0.8 GiB per rank (§3.1 gives 0.6-1.0). The caching allocator's
    fragmentation: 5 % of everything allocated (§3.1 gives 5-10 %; the low end because the package sets
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, §6).

Verdict
    total = the sum of all of the above; it fits when total <= the card's memory, and ``margin_gib`` is what is
    left. GPU "GB" ratings are GiB in practice (a "24 GB" RTX 4090 has 24,564 MiB = 23.99 GiB), so
    ``gpu_mem_gib=24`` is the 4090. The notes' worked estimate (Qwen2-VL-7B, LoRA r=64, 1024 tokens x 1, HF
    "auto" buckets) is 19.9 GiB before the allocator reserve; the planner gives 19.9 + 1.0 reserve = 20.9 GiB.
    ``max_micro_batch`` is the largest micro-batch (at the same sequence length) whose total fits; 0 when even one
    sample does not.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rmpl_ds.backbones import get_spec, specs
from rmpl_ds.backbones.spec import LM_PROJECTIONS, FamilySpec, VisionGeometry
from rmpl_ds.ds_config import bucket_elements
from rmpl_ds.errors import ConfigError, UserError

if TYPE_CHECKING:
    from rmpl_ds.config import Recipe

GIB = 2**30
# §3.1: CUDA context + cuBLAS workspace + NCCL buffers are 0.6-1.0 GiB per rank; the notes use 0.8.
CUDA_CONTEXT_GIB = 0.8
# §3.1: the caching allocator's fragmentation adds 5-10 %; 5 % with expandable segments (§6).
ALLOCATOR_RESERVE_FRACTION = 0.05
# §3.2: bf16 logits (2) + fp32 upcast (4) + fp32 log-softmax saved for backward (4), per token per vocab entry.
LOGITS_BYTES_PER_VOCAB_ENTRY = 10
# QLoRA paper: NF4 with double quantization stores 4 + 0.127 bits per parameter.
NF4_BITS_PER_PARAMETER = 4.127
# DeepSpeed's fp32 copies: gradient partition for the step (4), master weights (4), Adam momentum + variance (8).
FP32_GRAD_BYTES = 4
FP32_MASTER_AND_ADAM_BYTES = 12
# The package's ds_configs/zero2.json (tests check these match the file).
DEFAULT_REDUCE_BUCKET_SIZE = 50_000_000
DEFAULT_OVERLAP_COMM = True
# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py) for a ds config that leaves the key out.
DEEPSPEED_REDUCE_BUCKET_SIZE = 500_000_000
# The largest micro-batch the search tries; a plan that fits even this reports it with a note.
MAX_MICRO_BATCH_SEARCH = 256
# PEFT target names of the LLM's seven projections: the family default when a recipe's lora.targets is null.
DEFAULT_LORA_TARGETS: tuple[str, ...] = LM_PROJECTIONS

Mode = Literal["lora", "qlora", "full"]
MODES: tuple[str, ...] = ("lora", "qlora", "full")
LOSSES: tuple[str, ...] = ("target_only", "full_logits", "fused")
# The recipe's default model.max_target_tokens (rmpl_ds.config.ModelConfig).
DEFAULT_TARGET_TOKENS = 256
SUPPORTED_ZERO_STAGES = (0, 1, 2)

# Backbone name -> full-size config shipped in rmpl_ds/model_configs, from each family's spec.
BACKBONES: dict[str, str] = {spec.size_name: spec.full_size_config for spec in specs()}


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class PlanSettings:
    """Everything the planner needs besides the architecture.

    ``backbone`` is a name in :data:`BACKBONES`, a directory holding ``config.json`` (a tiny test model works), a
    ``.json`` file, or an already-loaded config mapping. ``lora_targets`` None means :data:`DEFAULT_LORA_TARGETS`.
    ``image_tokens`` None derives them from ``image_size`` with the family's processor rules (324 for Qwen2-VL at
    512 px, 256 for the others). ``reduce_bucket_size``/``overlap_comm``/``contiguous_gradients`` are the DeepSpeed
    ``zero_optimization`` keys. ``loss`` is the recipe's ``model.loss`` (``target_only`` projects at most
    ``target_tokens`` positions per sample through the LM head, ``full_logits`` all of them) or ``fused``, a fused
    linear + cross-entropy (Liger).
    ``quantize_vision_tower`` (QLoRA only) follows transformers' default, which quantizes every frozen Linear but
    lm_head.
    """

    backbone: str | Mapping[str, Any]
    mode: Mode = "lora"
    gpus: int = 2
    gpu_mem_gib: float = 24.0
    lora_rank: int = 64
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.05
    seq_len: int = 2048
    micro_batch: int = 1
    zero_stage: int = 2
    offload: bool = False
    image_tokens: int | None = None
    image_size: int = 512
    images_per_sample: int = 1
    gradient_checkpointing: bool = True
    train_vision_tower: bool = False
    train_projector: bool = False
    dtype: Literal["bf16", "fp32"] = "bf16"
    loss: Literal["target_only", "full_logits", "fused"] = "target_only"
    target_tokens: int = DEFAULT_TARGET_TOKENS
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET_SIZE
    overlap_comm: bool = DEFAULT_OVERLAP_COMM
    contiguous_gradients: bool = True
    quantize_vision_tower: bool = True


def settings_problems(settings: PlanSettings) -> list[str]:
    """Every problem with ``settings`` as ``field: message`` (empty when they are usable)."""
    problems = []
    for name in (
        "gpus",
        "seq_len",
        "micro_batch",
        "image_size",
        "images_per_sample",
        "reduce_bucket_size",
        "target_tokens",
    ):
        if not getattr(settings, name) >= 1:
            problems.append(f"{name}: must be >= 1, got {getattr(settings, name)}")
    if not settings.gpu_mem_gib > 0:
        problems.append(f"gpu_mem_gib: must be > 0, got {settings.gpu_mem_gib}")
    if settings.mode not in MODES:
        problems.append(f"mode: must be one of {', '.join(MODES)}, got {settings.mode!r}")
    if settings.mode != "full" and not settings.lora_rank >= 1:
        problems.append(f"lora_rank: must be >= 1, got {settings.lora_rank}")
    if not 0 <= settings.lora_dropout < 1:
        problems.append(f"lora_dropout: must be in [0, 1), got {settings.lora_dropout}")
    if settings.lora_targets is not None and not settings.lora_targets:
        problems.append("lora_targets: must name at least one module (or be null for the default)")
    if settings.zero_stage not in SUPPORTED_ZERO_STAGES:
        problems.append(
            f"zero_stage: the planner models ZeRO-0, 1 and 2, got {settings.zero_stage} "
            "(ZeRO-3 is not used here: it would shard the frozen base over PCIe without P2P)"
        )
    if settings.dtype not in ("bf16", "fp32"):
        problems.append(f"dtype: must be bf16 or fp32, got {settings.dtype!r}")
    if settings.mode == "qlora" and settings.dtype != "bf16":
        problems.append("dtype: qlora computes in bf16")
    if settings.loss not in LOSSES:
        problems.append(f"loss: must be one of {', '.join(LOSSES)}, got {settings.loss!r}")
    if settings.image_tokens is not None:
        if settings.image_tokens < 0:
            problems.append(f"image_tokens: must be >= 0, got {settings.image_tokens}")
        elif settings.image_tokens * settings.images_per_sample > settings.seq_len:
            problems.append(
                f"image_tokens: {settings.image_tokens} x {settings.images_per_sample} image(s) do not fit in "
                f"seq_len {settings.seq_len} (the sequence length counts image tokens)"
            )
    return problems


# ------------------------------------------------------------------------------------------ architecture


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the whole model by part; ``vision`` includes ``projector`` (the ViT-to-LLM mergers)."""

    total: int
    language: int
    vision: int
    projector: int


@dataclass(frozen=True)
class TextGeometry:
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int
    vocab: int


@dataclass(frozen=True)
class _Linear:
    name: str
    part: Literal["language", "vision", "projector"]
    in_features: int
    out_features: int


@dataclass(frozen=True)
class _Architecture:
    """What the meta-device instantiation tells the planner (cached per config)."""

    model_type: str
    class_name: str
    counts: ParamCounts
    linears: tuple[_Linear, ...]
    text: TextGeometry
    vision: VisionGeometry


def _spec_of(model_type: Any) -> FamilySpec:
    for spec in specs():
        if spec.model_type == model_type:
            return spec
    raise UserError(
        f"model_type {model_type!r} is not a family the planner knows; known: "
        f"{', '.join(spec.model_type for spec in specs())} (the families of rmpl_ds.backbones)"
    )


def load_backbone(spec: str | Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Resolve a backbone to ``(display name, config dict)``.

    Args:
        spec: a name in :data:`BACKBONES`, a directory with ``config.json``, a ``.json`` file, or a config mapping.

    Raises:
        UserError: an unknown name, a missing directory or file, or unreadable JSON.
    """
    if isinstance(spec, Mapping):
        return str(spec.get("_name_or_path") or spec.get("model_type", "<config>")), dict(spec)
    text = str(spec)
    if text in BACKBONES:
        resource = importlib.resources.files("rmpl_ds") / "model_configs" / BACKBONES[text]
        return text, json.loads(resource.read_text(encoding="utf-8"))
    path = Path(text)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"backbone {text!r}: not a known backbone ({', '.join(BACKBONES)}) and not a directory with config.json"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file}: cannot read the model config: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object")
    return text, config


def count_parameters(config_or_dir: str | Path | Mapping[str, Any]) -> ParamCounts:
    """Exact parameter counts of a backbone, from its config instantiated on the meta device (cached).

    Raises:
        UserError: the backbone cannot be found or read, or its model_type is not a supported family.
    """
    return _architecture(load_backbone(config_or_dir)[1]).counts


def lora_parameters(config_or_dir: str | Path | Mapping[str, Any], rank: int, targets: tuple[str, ...] | None) -> int:
    """Trainable LoRA parameters: ``rank x (in + out)`` over the targeted Linear layers of the language model."""
    architecture = _architecture(load_backbone(config_or_dir)[1])
    return rank * sum(lin.in_features + lin.out_features for lin in _lora_linears(architecture, targets))


def _architecture(config: dict[str, Any]) -> _Architecture:
    _spec_of(config.get("model_type"))
    # The display name is not part of the architecture; leaving it out keeps one cache entry per architecture.
    return _instantiate(json.dumps({k: v for k, v in config.items() if k != "_name_or_path"}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _instantiate(config_json: str) -> _Architecture:
    # Heavy imports stay here: the planner's callers (the CLI's --help, recipe checks) must not pay for them.
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    raw = json.loads(config_json)
    model_type = raw.pop("model_type")
    spec = _spec_of(model_type)
    try:
        hf_config = AutoConfig.for_model(model_type, **raw)
        # The meta device allocates nothing: the full-size model's module tree and shapes in about a second.
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(hf_config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise UserError(f"cannot build a {model_type} model from its config: {error}") from None

    def part_of(name: str) -> Literal["language", "vision", "projector"]:
        if spec.is_language_parameter(name):
            return "language"
        return "projector" if spec.is_projector_parameter(name) else "vision"

    totals = {"language": 0, "vision": 0, "projector": 0}
    # named_parameters() de-duplicates tied tensors, so a tied lm_head is counted once.
    for name, parameter in model.named_parameters():
        totals[part_of(name)] += parameter.numel()
    linears = tuple(
        _Linear(name, part_of(name), module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    text = hf_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    counts = ParamCounts(
        total=sum(totals.values()),
        language=totals["language"],
        vision=totals["vision"] + totals["projector"],
        projector=totals["projector"],
    )
    return _Architecture(
        model_type=model_type,
        class_name=type(model).__name__,
        counts=counts,
        linears=linears,
        text=TextGeometry(
            hidden=text.hidden_size,
            layers=text.num_hidden_layers,
            intermediate=text.intermediate_size,
            kv_dim=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
        ),
        vision=spec.vision_geometry(hf_config),
    )


def _lora_linears(architecture: _Architecture, targets: tuple[str, ...] | None) -> list[_Linear]:
    wanted = set(targets or _spec_of(architecture.model_type).lora_targets)
    language = [lin for lin in architecture.linears if lin.part == "language"]
    chosen = [lin for lin in language if lin.name.rsplit(".", 1)[-1] in wanted]
    missing = wanted - {lin.name.rsplit(".", 1)[-1] for lin in chosen}
    if missing:
        known = sorted({lin.name.rsplit(".", 1)[-1] for lin in language})
        raise UserError(
            f"lora targets {sorted(missing)} match no Linear layer of the {architecture.model_type} language model; "
            f"its Linear names are {known}"
        )
    return chosen


# -------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TrainingParams:
    """Parameter counts of one plan: the model's parts and what the optimizer sees."""

    total: int
    language: int
    vision: int
    trainable: int
    lora: int
    quantized: int


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory at the peak of a training step.

    ``breakdown`` maps each component (always the same keys, in :data:`COMPONENTS` order) to GiB and ``details``
    says how each was computed; ``per_gpu_gib`` is their sum; ``fits`` is ``per_gpu_gib <= capacity_gib``;
    ``margin_gib`` is ``capacity_gib - per_gpu_gib``; ``max_micro_batch`` is the largest micro-batch at the same
    sequence length that fits (0 if none).
    """

    backbone: str
    architecture: str
    settings: PlanSettings
    image_tokens: int
    params: TrainingParams
    breakdown: dict[str, float]
    details: dict[str, str]
    per_gpu_gib: float
    capacity_gib: float
    fits: bool
    margin_gib: float
    max_micro_batch: int
    notes: tuple[str, ...]

    @property
    def model_state_gib(self) -> float:
        """Weights + gradients + optimizer states: what DeepSpeed's ZeRO-2 estimator estimates."""
        return sum(self.breakdown[key] for key in MODEL_STATE_COMPONENTS)

    def to_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.settings)
        settings["backbone"] = self.backbone
        settings["image_tokens"] = self.image_tokens
        return {
            "backbone": self.backbone,
            "architecture": self.architecture,
            "settings": settings,
            "params": dataclasses.asdict(self.params),
            "breakdown": {key: round(value, 4) for key, value in self.breakdown.items()},
            "per_gpu_gib": round(self.per_gpu_gib, 4),
            "capacity_gib": self.capacity_gib,
            "fits": self.fits,
            "margin_gib": round(self.margin_gib, 4),
            "max_micro_batch": self.max_micro_batch,
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """A readable table: one line per non-zero component, the total against capacity, margin and verdict."""
        s, p = self.settings, self.params
        mode = f"{s.mode} r={s.lora_rank}" if s.mode != "full" else "full fine-tuning"
        offload = ", optimizer offloaded to CPU" if s.offload else ""
        lines = [
            f"{self.backbone} ({self.architecture}): {mode}, {s.gpus} GPU(s) x {s.gpu_mem_gib:g} GiB, "
            f"ZeRO-{s.zero_stage}, {s.dtype}{offload}",
            f"  {s.seq_len} tokens x micro batch {s.micro_batch} ({self.image_tokens} image tokens per image), "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, loss {s.loss}"
            + (f" (<= {s.target_tokens} target tokens per sample)" if s.loss == "target_only" else ""),
            f"  parameters: {_millions(p.total)} total ({_millions(p.language)} language, {_millions(p.vision)} "
            f"vision); trainable {_millions(p.trainable)}"
            + (f" (LoRA {_millions(p.lora)})" if p.lora else "")
            + (f"; {_millions(p.quantized)} in 4-bit" if p.quantized else ""),
            "",
        ]
        width = max(len(label) for label in COMPONENTS.values())
        lines.append(f"  {'component':<{width}}  {'GiB':>7}  how")
        for key, value in self.breakdown.items():
            if value > 0:
                lines.append(f"  {COMPONENTS[key]:<{width}}  {value:7.2f}  {self.details[key]}")
        lines.append("  " + "-" * (width + 11))
        lines.append(f"  {'total per GPU':<{width}}  {self.per_gpu_gib:7.2f}  of {self.capacity_gib:g} GiB")
        lines.append(f"  {'margin':<{width}}  {self.margin_gib:7.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(
            f"  verdict: {verdict}; largest micro batch that fits at {s.seq_len} tokens: {self.max_micro_batch}"
        )
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


# Component key -> label, in the order of the breakdown.
COMPONENTS: dict[str, str] = {
    "weights": "weights",
    "adapter_weights": "LoRA adapter weights",
    "gradients": "gradients (ZeRO-partitioned)",
    "optimizer_states": "optimizer states (ZeRO-partitioned)",
    "buckets": "communication buckets",
    "activation_boundaries": "activations: layer boundaries",
    "activation_layers": "activations: recomputed layer",
    "logits": "logits + loss",
    "vision_tower": "vision tower activations",
    "dequant_buffer": "4-bit dequantization buffer",
    "cuda_context": "CUDA context",
    "allocator_reserve": "allocator reserve",
}
MODEL_STATE_COMPONENTS = ("weights", "adapter_weights", "gradients", "optimizer_states")


def plan_memory(settings: PlanSettings) -> MemoryPlan:
    """Per-GPU memory of one training configuration: breakdown, total, verdict and the largest micro-batch.

    Pure apart from reading the backbone's config when it is given by name or path (and the cached meta-device
    instantiation); see the module docstring for every formula.

    Raises:
        ConfigError: settings with problems, all listed.
        UserError: an unknown or unreadable backbone, or LoRA targets that match nothing.
    """
    problems = settings_problems(settings)
    if problems:
        raise ConfigError("plan settings", problems)
    name, config = load_backbone(settings.backbone)
    architecture = _architecture(config)
    image_tokens = _image_tokens(architecture.vision, settings)
    if image_tokens * settings.images_per_sample > settings.seq_len:
        raise ConfigError(
            "plan settings",
            [
                f"seq_len: {settings.seq_len} tokens cannot hold {settings.images_per_sample} image(s) of "
                f"{image_tokens} tokens at image_size {settings.image_size}"
            ],
        )
    lines, params = _breakdown(settings, architecture, image_tokens, settings.micro_batch)
    total = sum(value for value, _ in lines.values())
    max_micro_batch = _max_micro_batch(settings, architecture, image_tokens)
    breakdown = {key: value / GIB for key, (value, _) in lines.items()}
    per_gpu = total / GIB
    plan = MemoryPlan(
        backbone=name,
        architecture=architecture.class_name,
        settings=settings,
        image_tokens=image_tokens,
        params=params,
        breakdown=breakdown,
        details={key: detail for key, (_, detail) in lines.items()},
        per_gpu_gib=per_gpu,
        capacity_gib=float(settings.gpu_mem_gib),
        fits=per_gpu <= settings.gpu_mem_gib,
        margin_gib=settings.gpu_mem_gib - per_gpu,
        max_micro_batch=max_micro_batch,
        notes=(),
    )
    return dataclasses.replace(plan, notes=tuple(_notes(plan, architecture)))


def _image_tokens(vision: VisionGeometry, settings: PlanSettings) -> int:
    if settings.image_tokens is not None:
        return settings.image_tokens
    if vision.kind == "tiles":
        return _tiles(vision, settings.image_size) * vision.tokens_per_tile
    return (_qwen_side(vision, settings.image_size) // vision.patch) ** 2 // vision.merge**2


def _qwen_side(vision: VisionGeometry, image_size: int) -> int:
    # Qwen-VL's smart_resize rounds each side to a multiple of patch x merge (512 -> 504 for 14-px patches).
    factor = vision.patch * vision.merge
    return max(factor, round(image_size / factor) * factor)


def _tiles(vision: VisionGeometry, image_size: int) -> int:
    # InternVL's processor (crop_to_patches, at most 12 tiles) keeps a square image on one tile until its area
    # exceeds half of the next square grid's (notes §1.4: 634 px -> 2x2), and adds a thumbnail to any grid.
    grid = 1
    for side in range(2, 4):
        if image_size**2 > 0.5 * vision.tile**2 * side**2:
            grid = side
    return 1 if grid == 1 else grid * grid + 1


def _vision_patches(vision: VisionGeometry, image_tokens: int) -> tuple[int, int]:
    """``(patches per image, longest attention sequence)`` for an image of ``image_tokens`` LLM tokens."""
    if vision.kind == "tiles":
        tiles = max(1, math.ceil(image_tokens / vision.tokens_per_tile))
        per_tile = (vision.tile // vision.patch) ** 2 + 1  # + the CLS token
        return tiles * per_tile, per_tile
    patches = image_tokens * vision.merge**2
    return patches, patches


def _breakdown(
    settings: PlanSettings, arch: _Architecture, image_tokens: int, micro_batch: int
) -> tuple[dict[str, tuple[float, str]], TrainingParams]:
    """Bytes and a how-computed note per component (see the module docstring)."""
    counts, text = arch.counts, arch.text
    e = 2 if settings.dtype == "bf16" else 4
    n = settings.gpus
    lora_mode = settings.mode in ("lora", "qlora")
    lora_linears = _lora_linears(arch, settings.lora_targets) if lora_mode else []
    p_lora = settings.lora_rank * sum(lin.in_features + lin.out_features for lin in lora_linears)

    tower = counts.vision - counts.projector
    trained_base = (
        (counts.language if settings.mode == "full" else 0)
        + (tower if settings.train_vision_tower else 0)
        + (counts.projector if settings.train_projector else 0)
    )
    trainable = p_lora + trained_base

    frozen_parts = set() if settings.mode != "qlora" else {"language"}
    if settings.mode == "qlora" and settings.quantize_vision_tower and not settings.train_vision_tower:
        frozen_parts.add("vision")
    if settings.mode == "qlora" and settings.quantize_vision_tower and not settings.train_projector:
        frozen_parts.add("projector")
    # transformers never quantizes the output embedding (quantizers/base.py, get_keys_to_not_convert).
    quantized_linears = [lin for lin in arch.linears if lin.part in frozen_parts and lin.name != "lm_head"]
    quantized = sum(lin.in_features * lin.out_features for lin in quantized_linears)
    nf4 = NF4_BITS_PER_PARAMETER / 8

    lines: dict[str, tuple[float, str]] = {}
    weights = e * (counts.total - quantized) + nf4 * quantized
    if quantized:
        detail = f"{nf4:.3f} B x {_millions(quantized)} NF4 + {e} B x {_millions(counts.total - quantized)}, replicated"
    else:
        detail = f"{e} B x {_millions(counts.total)}, replicated on every GPU"
    lines["weights"] = (weights, detail)
    lines["adapter_weights"] = (e * p_lora, f"{e} B x {_millions(p_lora)} (r={settings.lora_rank})" if p_lora else "")

    stage = settings.zero_stage
    if settings.offload:
        lines["gradients"] = (0.0, "in host memory (offload_optimizer)")
        lines["optimizer_states"] = (0.0, "in host memory (offload_optimizer)")
    else:
        shards = 1 if stage == 0 else n  # ZeRO-0 partitions nothing: every rank holds every state
        if stage == 2:
            grad = (e + FP32_GRAD_BYTES) * trainable / n
            grad_detail = f"({e} + {FP32_GRAD_BYTES}) B x {_millions(trainable)} / {n}"
        else:
            grad = e * trainable + FP32_GRAD_BYTES * trainable / shards
            grad_detail = f"{e} B x {_millions(trainable)} + {FP32_GRAD_BYTES} B x {_millions(trainable)} / {shards}"
        lines["gradients"] = (grad, grad_detail)
        lines["optimizer_states"] = (
            FP32_MASTER_AND_ADAM_BYTES * trainable / shards,
            f"{FP32_MASTER_AND_ADAM_BYTES} B x {_millions(trainable)} / {shards} (fp32 master + Adam m, v)",
        )

    buffers = (2 if settings.overlap_comm else 1) if settings.contiguous_gradients and trainable and stage else 0
    bucket = bucket_elements(settings.reduce_bucket_size, trainable) if trainable else 0
    buckets = buffers * bucket * e
    bucket_detail = f"{buffers} x {bucket:.3g} x {e} B reduce buffer(s)"
    if settings.offload and trainable:
        largest = _largest_trainable(arch, settings, lora_linears)
        buckets += largest * e
        bucket_detail += f" + {_millions(largest)} x {e} B offload staging"
    lines["buckets"] = (buckets, bucket_detail if trainable else "nothing to reduce")

    tokens = settings.seq_len * micro_batch
    boundary = text.layers * text.hidden * e
    per_layer = (6 * text.hidden + 2 * text.kv_dim + 4 * text.hidden + 4 * text.intermediate) * e
    if lora_mode and settings.lora_dropout > 0:
        # PEFT keeps each adapted linear's dropped-out input; averaged over the layers that carry adapters.
        per_layer += e * sum(lin.in_features for lin in lora_linears if lin.name != "lm_head") // text.layers
    if settings.gradient_checkpointing:
        lines["activation_boundaries"] = (
            tokens * boundary,
            f"{tokens} tok x {text.layers} layers x {text.hidden} x {e} B",
        )
        lines["activation_layers"] = (tokens * per_layer, f"{tokens} tok x {per_layer / 2**20:.3f} MiB (one layer)")
    else:
        lines["activation_boundaries"] = (0.0, "no checkpointing: included in the layers")
        lines["activation_layers"] = (
            tokens * per_layer * text.layers,
            f"{tokens} tok x {text.layers} layers x {per_layer / 2**20:.3f} MiB (no checkpointing)",
        )

    if settings.loss == "full_logits":
        lines["logits"] = (
            tokens * text.vocab * LOGITS_BYTES_PER_VOCAB_ENTRY,
            f"every position: {tokens} tok x {text.vocab} vocab x {LOGITS_BYTES_PER_VOCAB_ENTRY} B "
            "(bf16 + fp32 + fp32 log-softmax)",
        )
    elif settings.loss == "target_only":
        projected = min(settings.seq_len, settings.target_tokens) * micro_batch
        lines["logits"] = (
            projected * text.vocab * LOGITS_BYTES_PER_VOCAB_ENTRY,
            f"target positions only: {projected} (<= {settings.target_tokens} per sample) x {text.vocab} vocab x "
            f"{LOGITS_BYTES_PER_VOCAB_ENTRY} B",
        )
    else:
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(text.vocab / text.hidden)))))
        lines["logits"] = (
            chunk * text.vocab * 8 + tokens * text.hidden * 4,
            f"fused CE: {chunk}-token chunk x {text.vocab} x 8 B + fp32 input gradient",
        )

    lines["vision_tower"] = _vision_activations(settings, arch.vision, image_tokens, micro_batch, e)

    if quantized_linears:
        largest_quantized = max(lin.in_features * lin.out_features for lin in quantized_linears)
        lines["dequant_buffer"] = (
            largest_quantized * e,
            f"largest 4-bit matrix ({_millions(largest_quantized)}) in bf16",
        )
    else:
        lines["dequant_buffer"] = (0.0, "")

    allocated = sum(value for value, _ in lines.values())
    lines["cuda_context"] = (CUDA_CONTEXT_GIB * GIB, "context + cuBLAS workspace + NCCL buffers")
    lines["allocator_reserve"] = (
        ALLOCATOR_RESERVE_FRACTION * allocated,
        f"{ALLOCATOR_RESERVE_FRACTION:.0%} of the allocations (fragmentation)",
    )
    params = TrainingParams(
        total=counts.total,
        language=counts.language,
        vision=counts.vision,
        trainable=trainable,
        lora=p_lora,
        quantized=quantized,
    )
    return lines, params


def _vision_activations(
    settings: PlanSettings, vision: VisionGeometry, image_tokens: int, micro_batch: int, e: int
) -> tuple[float, str]:
    if image_tokens == 0:
        return 0.0, "no image tokens"
    images = micro_batch * settings.images_per_sample
    patches, longest = _vision_patches(vision, image_tokens)
    scores = vision.heads * longest**2 * e
    if not settings.train_vision_tower:
        hidden = 2 * images * patches * vision.width * e
        return scores + hidden, f"frozen: forward transient ({images} image(s) x {patches} patches, one score matrix)"
    per_layer = (8 * vision.width + 2 * vision.mlp_width) * e
    if settings.gradient_checkpointing:
        kept = images * patches * (vision.depth * vision.width * e + per_layer)
    else:
        kept = images * patches * vision.depth * per_layer
    return kept + scores, f"trained: {images} image(s) x {patches} patches x {vision.depth} layers"


def _largest_trainable(arch: _Architecture, settings: PlanSettings, lora_linears: list[_Linear]) -> int:
    # The offload staging buffer holds the largest trainable tensor; the vocabulary matrices when the LLM trains.
    sizes = [settings.lora_rank * max(lin.in_features, lin.out_features) for lin in lora_linears]
    if settings.mode == "full":
        sizes.append(arch.text.vocab * arch.text.hidden)
    tower_linears = [lin for lin in arch.linears if lin.part in ("vision", "projector")]
    if settings.train_vision_tower or settings.train_projector:
        sizes += [lin.in_features * lin.out_features for lin in tower_linears]
    return max(sizes, default=0)


def _max_micro_batch(settings: PlanSettings, arch: _Architecture, image_tokens: int) -> int:
    # Memory grows with the micro-batch, so the first one that does not fit ends the search.
    best = 0
    for micro_batch in range(1, MAX_MICRO_BATCH_SEARCH + 1):
        lines, _ = _breakdown(settings, arch, image_tokens, micro_batch)
        if sum(value for value, _ in lines.values()) / GIB > settings.gpu_mem_gib:
            break
        best = micro_batch
    return best


def _notes(plan: MemoryPlan, arch: _Architecture) -> list[str]:
    s = plan.settings
    notes = []
    if s.loss == "full_logits" and plan.breakdown["logits"] > 0.5:
        lean = _total_gib(dataclasses.replace(s, loss="target_only"), arch, plan.image_tokens)
        notes.append(
            f"the logits term is {plan.breakdown['logits']:.2f} GiB; model.loss: target_only (the default) makes the "
            f"total {lean:.2f} GiB ({'fits' if lean <= s.gpu_mem_gib else 'still does not fit'})"
        )
    if s.loss == "target_only":
        notes.append(
            f"the LM head projects at most {s.target_tokens} target positions per sample (model.max_target_tokens; "
            "a longer target is truncated, counted and logged)"
        )
    if not s.offload and plan.params.trainable:
        notes.append(_zero_note(plan, arch))
    e = 2 if s.dtype == "bf16" else 4
    reduce_buffers = (2 if s.overlap_comm else 1) * s.reduce_bucket_size * e / GIB
    if s.contiguous_gradients and plan.params.trainable and reduce_buffers > 0.5:
        notes.append(
            f"the ZeRO reduce buckets take {reduce_buffers:.2f} GiB; reduce_bucket_size 5e7 (or "
            "overlap_comm false) costs a fraction of that with no loss of speed under LoRA"
        )
    if s.offload:
        host = plan.params.trainable * max(4 * s.gpus, 16) * 1.5 / GIB
        notes.append(f"offload_optimizer needs about {host:.1f} GiB of host memory per node (DeepSpeed's estimate)")
    if s.mode == "qlora" and plan.params.quantized:
        # prepare_model_for_kbit_training upcasts the unquantized parameters to fp32 before DeepSpeed casts them back.
        upcast = (plan.params.total - plan.params.quantized) * 2 / GIB
        notes.append(
            f"while loading, prepare_model_for_kbit_training holds the unquantized parameters in fp32 (+{upcast:.2f} "
            "GiB) until DeepSpeed casts them back to bf16; that is before training and below this peak"
            if plan.breakdown["weights"] + upcast < plan.per_gpu_gib
            else f"while loading, prepare_model_for_kbit_training holds the unquantized parameters in fp32 "
            f"(+{upcast:.2f} GiB), which is above this training peak"
        )
    if not s.train_vision_tower and plan.image_tokens:
        notes.append(
            "the frozen vision tower keeps no activations; its line is the forward transient (FA2 avoids most)"
        )
    if arch.vision.kind == "tiles" and plan.image_tokens > arch.vision.tokens_per_tile:
        notes.append(
            f"at {s.image_size} px InternVL's processor uses {plan.image_tokens // arch.vision.tokens_per_tile} tiles "
            f"({plan.image_tokens} tokens); below 634 px it uses one"
        )
    if s.mode == "full" and not plan.fits:
        notes.append(
            f"full fine-tuning keeps 2 B per parameter on every GPU plus 18 B per trainable parameter / {s.gpus} "
            f"({plan.model_state_gib:.1f} GiB of model states): use lora or qlora"
        )
    if plan.max_micro_batch == 0:
        notes.append(f"even micro batch 1 does not fit at {s.seq_len} tokens")
    elif plan.max_micro_batch == MAX_MICRO_BATCH_SEARCH:
        notes.append(f"micro batches up to at least {MAX_MICRO_BATCH_SEARCH} fit (the search stops there)")
    return notes


def _zero_note(plan: MemoryPlan, arch: _Architecture) -> str:
    """When ZeRO-2 pays: what the same step needs at the other stages (``launch.zero_stage`` picks one)."""
    s = plan.settings
    totals = {
        stage: _total_gib(dataclasses.replace(s, zero_stage=stage), arch, plan.image_tokens) for stage in (0, 1, 2)
    }
    saved = totals[0] - totals[2]
    if totals[0] <= s.gpu_mem_gib and saved < 0.25 * s.gpu_mem_gib:
        advice = (
            f"ZeRO-2 saves only {saved:.2f} GiB here and ZeRO-0 fits (margin {s.gpu_mem_gib - totals[0]:.2f} GiB): "
            "launch.zero_stage=0 (or 1) skips the partitioning work of every step (bench/results/trainer.md)"
        )
    else:
        advice = f"ZeRO-2 pays here: it saves {saved:.2f} GiB per GPU over ZeRO-0" + (
            "" if totals[0] <= s.gpu_mem_gib else ", which does not fit"
        )
    return f"ZeRO-0 / 1 / 2: {totals[0]:.2f} / {totals[1]:.2f} / {totals[2]:.2f} GiB per GPU; {advice}"


def _total_gib(settings: PlanSettings, arch: _Architecture, image_tokens: int) -> float:
    lines, _ = _breakdown(settings, arch, image_tokens, settings.micro_batch)
    return sum(value for value, _ in lines.values()) / GIB


def compare_losses(plan: MemoryPlan) -> dict[str, dict[str, Any]]:
    """``plan``'s total under each loss path (:data:`LOSSES`): per-GPU GiB, the logits term, fit and margin, and the
    largest micro-batch that fits; the same settings otherwise (``rmpl-ds plan --compare-losses``)."""
    rows = {}
    for loss in LOSSES:
        other = plan if loss == plan.settings.loss else plan_memory(dataclasses.replace(plan.settings, loss=loss))
        rows[loss] = {
            "per_gpu_gib": round(other.per_gpu_gib, 4),
            "logits_gib": round(other.breakdown["logits"], 4),
            "fits": other.fits,
            "margin_gib": round(other.margin_gib, 4),
            "max_micro_batch": other.max_micro_batch,
        }
    return rows


def format_comparison(rows: dict[str, dict[str, Any]], current: str) -> str:
    """The :func:`compare_losses` rows as a small table (the plan's own loss path marked)."""
    lines = [f"  {'loss path':<14} {'logits GiB':>10} {'total GiB':>10} {'margin':>8}  verdict, largest micro batch"]
    for loss, row in rows.items():
        verdict = "fits" if row["fits"] else "DOES NOT FIT"
        mark = "  <- this plan" if loss == current else ""
        lines.append(
            f"  {loss:<14} {row['logits_gib']:10.2f} {row['per_gpu_gib']:10.2f} {row['margin_gib']:8.2f}  "
            f"{verdict}, {row['max_micro_batch']}{mark}"
        )
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M"


# ----------------------------------------------------------------------------------------------- recipes


def plan_recipe(
    recipe: Recipe,
    world_size: int | None = None,
    *,
    gpu_mem_gib: float = 24.0,
    stage: str | None = None,
    loss: Literal["target_only", "full_logits", "fused"] | None = None,
) -> MemoryPlan:
    """Plan a recipe's most demanding stage (largest micro_batch at the model's max_seq_len) or the named one.

    ``loss`` overrides the recipe's ``model.loss`` (e.g. ``full_logits`` to see what the reference path costs, or
    ``fused`` for a Liger-style loss the package does not ship); the logits term follows
    ``model.max_target_tokens`` for ``target_only``.

    The backbone is ``model.path``'s config.json. When that directory does not exist and is named after the family's
    released checkpoint (``models/Qwen2-VL-7B-Instruct`` in the paper recipes), the shipped full-size config stands
    in for it, since the architecture is the same; any other missing directory (the demo's tiny model before
    ``make demo`` builds it) is a UserError rather than a plan for a model the recipe does not name. The ZeRO stage,
    buckets and offload come from ``launch.deepspeed_config``.

    Raises:
        UserError: a missing model directory (see above), a DeepSpeed config that cannot be read, a family that
            does not match the config's model_type, or a named stage the recipe does not have.
    """
    from rmpl_ds.ds_config import recipe_ds_config, zero_stage

    model = recipe.model
    chosen = recipe.stage(stage) if stage is not None else max(recipe.stages, key=lambda s: s.micro_batch)
    name, config = recipe_backbone(recipe)
    ds_config = recipe_ds_config(recipe.launch)
    zero = ds_config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer") or {}
    settings = PlanSettings(
        backbone={**config, "_name_or_path": name},
        mode=model.mode,
        gpus=world_size or recipe.launch.world_size,
        gpu_mem_gib=gpu_mem_gib,
        lora_rank=model.lora.rank,
        lora_targets=model.lora.targets,
        lora_dropout=model.lora.dropout,
        seq_len=model.max_seq_len,
        micro_batch=chosen.micro_batch,
        zero_stage=zero_stage(ds_config),
        offload=offload.get("device") == "cpu",
        image_tokens=model.max_image_tokens,
        image_size=model.image_size,
        gradient_checkpointing=model.gradient_checkpointing,
        train_vision_tower=model.train_vision_tower,
        train_projector=model.train_projector,
        dtype=model.dtype,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET_SIZE)),
        # DeepSpeed turns overlap_comm on by default only for ZeRO-3 (zero/config.py, overlap_comm_valid).
        overlap_comm=bool(zero.get("overlap_comm", False)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        loss=loss or model.loss,
        target_tokens=model.max_target_tokens,
    )
    plan = plan_memory(settings)
    stage_note = f"recipe {recipe.name}, stage {chosen.name} (micro batch {chosen.micro_batch})"
    return dataclasses.replace(plan, notes=(stage_note, *plan.notes))


def recipe_backbone(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """The recipe model's (display name, config): its directory's config.json, or the shipped full-size config when
    the directory is missing and named after the released checkpoint (the paper recipes' models/Qwen2-VL-7B-Instruct);
    anything else (the demo's tiny model before it is built) is an error rather than a plan for the wrong model."""
    model = recipe.model
    spec = get_spec(model.family)
    model_type, full_size, checkpoint = spec.model_type, spec.size_name, spec.checkpoint_dir
    path = Path(model.path)
    if (path / "config.json").is_file():
        name, config = load_backbone(path)
    elif path.name == checkpoint:
        name, config = f"{full_size} (shipped config; {model.path} not present)", load_backbone(full_size)[1]
    else:
        raise UserError(
            f"model.path: {model.path} has no config.json. Build or download the model first (the demo's tiny model "
            f"comes from `make demo`); only a missing directory named {checkpoint!r} is planned from the shipped "
            f"full-size config. Or plan the architecture directly: rmpl-ds plan --backbone {full_size}"
        )
    if config.get("model_type") != model_type:
        raise UserError(
            f"model.family: {model.family} expects model_type {model_type!r}, but {name} has "
            f"{config.get('model_type')!r}"
        )
    return name, config


def check_fits(
    recipe: Recipe,
    world_size: int | None,
    gpu_mem_gib: float = 24.0,
    force: bool = False,
    *,
    stage: str | None = None,
) -> MemoryPlan:
    """The gate `rmpl-ds train` passes before starting: the plan, or a UserError with its breakdown.

    With ``force`` the plan is returned even when it does not fit (the caller logs that it was forced).

    Raises:
        UserError: the planner says the recipe does not fit (and not ``force``), or :func:`plan_recipe` fails.
    """
    plan = plan_recipe(recipe, world_size, gpu_mem_gib=gpu_mem_gib, stage=stage)
    if plan.fits or force:
        return plan
    hint = (
        f"micro_batch {plan.max_micro_batch} fits at max_seq_len {plan.settings.seq_len}"
        if plan.max_micro_batch
        else "no micro batch fits at this sequence length"
    )
    raise UserError(
        f"recipe {recipe.name}: the memory planner predicts {plan.per_gpu_gib:.2f} GiB per GPU, more than "
        f"{gpu_mem_gib:g} GiB ({hint}); pass --force to start anyway\n{plan.format_table()}"
    )
