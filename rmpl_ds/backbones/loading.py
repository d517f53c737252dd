"""Loading a backbone for training, and exporting what trained: the same code for 8B checkpoints and tiny models.

:func:`load_model` reads a local Hugging Face directory with ``from_pretrained`` in one of three modes
(:data:`MODES`):

* ``lora``: bf16 base + LoRA on the language model's projections (the recipe's ``model.lora``);
* ``qlora``: bitsandbytes NF4 base with double quantization and bf16 compute, k-bit preparation, loaded on this
  rank's own device; the LM head, the vision tower and the projector stay bf16;
* ``full``: every language-model weight trains (small models and planning).

Gradient checkpointing is non-reentrant, which gives frozen-base LoRA its gradients without any input-gradient hook,
so a frozen vision tower is never back-propagated through. :func:`export_adapter` writes the LoRA adapter in PEFT
format, :func:`merge_and_export` a merged full checkpoint (QLoRA: dequantize, merge, bf16). Everything here reads
the family from its :class:`~rmpl_ds.backbones.spec.FamilySpec`; encoding is rmpl_ds.backbones.adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rmpl_ds import atomic
from rmpl_ds.config import LoraConfig
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from rmpl_ds.backbones.adapter import BackboneAdapter, ProcessorBundle
    from rmpl_ds.backbones.spec import FamilySpec

logger = get_logger(__name__)

Mode = Literal["lora", "qlora", "full"]
MODES: tuple[Mode, ...] = ("lora", "qlora", "full")


def model_class(spec: FamilySpec) -> type[PreTrainedModel]:
    """The family's transformers model class (by name: no auto-class guessing)."""
    import transformers

    return getattr(transformers, spec.model_class)


def config_from_dict(spec: FamilySpec, config_dict: dict[str, Any]) -> PretrainedConfig:
    """A config object of the family's config class from a config.json dictionary."""
    from transformers import AutoConfig

    return type(AutoConfig.for_model(spec.model_type)).from_dict(config_dict)


def meta_parameter_count(spec: FamilySpec) -> int:
    """Parameters of the full-size architecture, counted by instantiating its config on the meta device."""
    import torch

    config = config_from_dict(spec, spec.full_size_config_dict())
    with torch.device("meta"):
        model = model_class(spec)._from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def resolve_model_dir(path: str | Path, spec: FamilySpec | None = None) -> Path:
    """The checkpoint directory ``path`` names, or a UserError saying how to provide the weights."""
    model_dir = Path(path).expanduser()
    if model_dir.is_dir() and (model_dir / "config.json").is_file():
        return model_dir.resolve()
    if model_dir.is_dir():
        raise UserError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    hub_name = spec.hub_name if spec is not None else "Qwen/Qwen2-VL-7B-Instruct"
    raise UserError(
        f"{str(path)!r} is not a local model directory. This package never downloads weights: fetch the "
        f"checkpoint once on a machine with hub access (e.g. `hf download {hub_name} --local-dir "
        f"models/{hub_name.rsplit('/', 1)[-1]}`; the hf command comes with huggingface_hub) and pass its path; for a "
        "tiny offline model to try things with, `rmpl-ds demo-data --out DIR --tiny-model MODEL_DIR`"
    )


def load_model(
    adapter: BackboneAdapter,
    path: str | Path,
    mode: Mode,
    *,
    lora: LoraConfig | None = None,
    train_vision_tower: bool = False,
    train_projector: bool = False,
    gradient_checkpointing: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    zero_stage: int | None = None,
    image_size: int | None = 512,
    max_image_tokens: int | None = None,
    attn_implementation: str | None = None,
    random_init: bool = False,
) -> tuple[PreTrainedModel, ProcessorBundle]:
    """Load a local checkpoint for training in ``mode`` and return ``(model, bundle)``.

    Args:
        adapter: the family's adapter (``get_adapter(family)``).
        path: local HF directory; a hub name is refused (nothing is ever downloaded).
        mode: ``lora``, ``qlora`` or ``full``.
        lora: LoRA hyperparameters (lora/qlora), the recipe's ``model.lora``; default :class:`LoraConfig`.
        train_vision_tower: lora/qlora: LoRA on the ViT linears too; full: the ViT weights train.
        train_projector: the projector trains fully (saved with the adapter in lora/qlora).
        gradient_checkpointing: non-reentrant activation checkpointing (no input-gradient hooks: nothing frozen
            is back-propagated through unless a trainable parameter lies before it).
        dtype: weight dtype (default bf16); under qlora the bf16 compute dtype of the 4-bit layers.
        device: where this rank's copy goes (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU);
            the whole model lands there, never ``device_map="auto"``.
        zero_stage: the DeepSpeed ZeRO stage the model will train under, when known; qlora refuses 3.
        image_size, max_image_tokens: see :meth:`BackboneAdapter.load_processor`.
        attn_implementation: e.g. ``"sdpa"`` or ``"flash_attention_2"``; default: transformers' choice.
        random_init: build the architecture of ``path``'s config.json with random weights instead of reading a
            checkpoint (benchmarks of full-size models where no weights exist; see :func:`_random_model`); the
            same modes, LoRA and checkpointing follow.

    Returns:
        The model in train mode (a ``PeftModel`` in lora/qlora) with ``config.use_cache = False``, and the
        processor bundle.

    Raises:
        UserError: bad path, family mismatch, unknown mode, LoRA settings the family cannot take, or qlora under
            ZeRO-3.
    """
    import torch

    spec = adapter.spec
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if mode == "qlora" and zero_stage == 3:
        raise UserError(
            "qlora cannot train under ZeRO stage 3 here: ZeRO-3 would shard the 4-bit base weights, which needs "
            "bitsandbytes quant-storage handling this package does not do (and ZeRO-3 buys nothing at 7-8B on "
            "two GPUs); use ZeRO stage 2 (deepspeed_config: zero2) or lora mode"
        )
    settings = lora or LoraConfig()
    if mode != "full":
        problems = [f"targets {message}" for message in spec.lora_target_problems(settings.targets)]
        problems += [f"rank must be > 0, got {settings.rank}"] * (settings.rank <= 0)
        problems += [f"alpha must be > 0, got {settings.alpha}"] * (settings.alpha <= 0)
        problems += [f"dropout must be in [0, 1), got {settings.dropout}"] * (not 0 <= settings.dropout < 1)
        if problems:
            raise UserError("model.lora: " + "; ".join(problems))
    dtype = dtype or torch.bfloat16
    bundle = adapter.load_processor(path, image_size=image_size, max_image_tokens=max_image_tokens)
    target_device = _resolve_device(device)

    load_kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": target_device}}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # The LM head, the vision tower and the projector stay in bf16: small, and precision-sensitive.
            llm_int8_skip_modules=list(spec.quantization_skip_modules),
        )
    if random_init:
        model = _random_model(spec, bundle, load_kwargs)
    else:
        model = model_class(spec).from_pretrained(bundle.path, **load_kwargs)
    # No KV cache in training (checkpointing would turn it off anyway, with a warning per forward).
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False

    if mode == "full":
        for name, parameter in model.named_parameters():
            if spec.is_projector_parameter(name):
                parameter.requires_grad_(train_projector)
            elif spec.is_vision_tower_parameter(name):
                parameter.requires_grad_(train_vision_tower)
            else:
                parameter.requires_grad_(True)
        if gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        model.train()
        return model, bundle

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if mode == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the base and upcasts the non-4-bit weights (norms, LM head, vision) to fp32 for stable
        # training; checkpointing is switched on below, the same way as in lora mode.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _keep_one_4bit_layout(model)
    else:
        model.requires_grad_(False)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    peft_config = PeftLoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=spec.lora_pattern(settings.targets, train_vision_tower=train_vision_tower),
        modules_to_save=_projector_module_names(spec, model) if train_projector else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    # PEFT hooks the input embeddings of every sub-model of a non-quantized base (for reentrant checkpointing,
    # which is not used here); see _enable_gradient_checkpointing.
    _drop_input_grad_hooks(model.get_base_model())
    model.train()
    return model, bundle


def _random_model(spec: FamilySpec, bundle: ProcessorBundle, load_kwargs: dict[str, Any]) -> PreTrainedModel:
    """The architecture of ``bundle.config`` with random weights (the family's own init, under the caller's seed),
    built directly on the target device in the target dtype; nothing is read from disk.

    For QLoRA the random bf16 weights are handed to ``from_pretrained`` as a state dict with the same
    ``quantization_config``, so transformers and bitsandbytes quantize them exactly as they would a checkpoint's.
    The bf16 copy is freed afterwards and, on a GPU, the peak-memory counters are reset: that transient copy is an
    artifact of having no checkpoint, not part of a real load.
    """
    import torch

    (device,) = set(load_kwargs["device_map"].values())
    extra = {key: load_kwargs[key] for key in ("attn_implementation",) if key in load_kwargs}
    with torch.device(device):
        model = model_class(spec)._from_config(bundle.config, dtype=load_kwargs["dtype"], **extra)
    if "quantization_config" not in load_kwargs:
        return model
    weights = model.state_dict()
    del model
    quantized = model_class(spec).from_pretrained(None, config=bundle.config, state_dict=weights, **load_kwargs)
    del weights
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return quantized


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_adapter(model: Any, out_dir: str | Path, bundle: ProcessorBundle | None = None) -> Path:
    """Save the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors), plus the
    tokenizer and image-processor settings when ``bundle`` is given; ``PeftModel.from_pretrained(base, out_dir)``
    loads it. Written to a temporary sibling and renamed, so a half-written directory never looks complete.

    Raises:
        UserError: ``model`` has no LoRA adapter (full mode: use :func:`merge_and_export`), or ``out_dir`` is not
            empty.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise UserError("export_adapter needs a lora/qlora model; a full-mode model is exported with merge_and_export")
    refuse_to_overwrite(out_dir)
    with atomic.directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if bundle is not None:
            bundle.save(staging)
    return Path(out_dir)


def merge_and_export(
    model: Any,
    out_dir: str | Path,
    bundle: ProcessorBundle | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a full HF checkpoint (``dtype``, default bf16) that :func:`load_model` reads in any mode.

    lora: the adapter is merged into the base weights. qlora: the NF4 base is dequantized first (the weights
    the adapter was trained against), then merged. full: saved as is. Tokenizer and image-processor settings
    go along when ``bundle`` is given. The model is consumed (merged in place): reload to train further.
    """
    import torch
    from peft import PeftModel

    dtype = dtype or torch.bfloat16
    refuse_to_overwrite(out_dir)  # before the model is consumed
    if isinstance(model, PeftModel):
        if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
            merged = _dequantize_and_merge(model, dtype)
        else:
            merged = model.merge_and_unload()
    else:
        merged = model
    merged = merged.to(dtype)
    merged.config.use_cache = True
    merged.config.get_text_config().use_cache = True
    with atomic.directory(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if bundle is not None:
            bundle.save(staging)
    return Path(out_dir)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked size, not their storage bytes."""
    trainable = total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        count = quant_state.shape.numel() if quant_state is not None else parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _projector_module_names(spec: FamilySpec, model: Any) -> list[str]:
    """The projector as PEFT ``modules_to_save`` entries: module lists (Qwen3-VL's DeepStack mergers) by item,
    since PEFT copies single modules only."""
    import torch

    names = []
    for prefix in spec.projector_modules:
        module = model.get_submodule(prefix)
        if isinstance(module, torch.nn.ModuleList):
            names.extend(f"{prefix}.{index}" for index in range(len(module)))
        else:
            names.append(prefix)
    return names


def _enable_gradient_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing recomputes a block from saved-tensor hooks, so a block whose inputs come from
    # frozen layers still gives its trainable weights (LoRA, or whatever trains) their gradients: nothing needs
    # an input that requires grad. transformers' activation_checkpointing_enable (and PEFT's wrapper, see
    # _drop_input_grad_hooks) nevertheless hook *every* sub-model's input embeddings to require grad, the
    # vision patch embedding included, which makes backward run through the whole frozen vision tower. The
    # hooks are removed: input gradients flow only where a trainable parameter puts them.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _drop_input_grad_hooks(model)


def _drop_input_grad_hooks(model: Any) -> None:
    """Remove the input-embedding hooks that ``enable_input_require_grads`` registered on ``model`` (an HF model).

    transformers keeps only the hooks of its latest call, so this runs right after each call that may add them
    (activation checkpointing, PEFT wrapping), never after two of them.
    """
    model.disable_input_require_grads()


def _dequantize_and_merge(model: Any, dtype: torch.dtype) -> Any:
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_name = model.active_adapter
    peft_config = model.peft_config[adapter_name]
    # state_dict() also undoes bitsandbytes' CPU inference repacking of 4-bit weights where it happened
    # (_keep_one_4bit_layout prevents it for models loaded here), so dequantization reads the real weights
    adapter_state = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
    base = model.unload()  # the quantized base without LoRA layers (trained modules_to_save copies dropped)
    if hasattr(base, "peft_config"):
        del base.peft_config  # unload() leaves it behind; the adapter is re-attached below
    base = base.dequantize(dtype=dtype).to(dtype)
    rebuilt = get_peft_model(base, peft_config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(rebuilt, adapter_state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights did not fit the dequantized base: {result.unexpected_keys[:5]}")
    return rebuilt.merge_and_unload()


def _keep_one_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a ``Linear4bit`` repacks its weight in place on the first eval-mode, no-grad call
    (evaluation, generation). From then on it computes through a bf16 kernel, ~1e-3 off the dequantized weights,
    in training too, and ``dequantize_4bit`` on the repacked bytes gives scrambled weights until a ``state_dict()``
    call packs them back. One layout for training, evaluation and export is worth the CPU inference speed; GPUs
    never repack.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _resolve_device(device: Any) -> Any:
    import torch

    from rmpl_ds import dist

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def refuse_to_overwrite(out_dir: str | Path) -> None:
    """UserError unless ``out_dir`` is absent or an empty directory (exports and tiny models never replace one)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; refusing to overwrite an export")
