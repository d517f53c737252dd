"""The backbone adapter protocol: one class per model family, the same code for 8B checkpoints and tiny test models.

An adapter knows four things about its family and nothing about stages, recipes or data sources:

* **loading** a local Hugging Face directory with ``from_pretrained`` in one of three modes (:data:`MODES`):
  ``lora`` (bf16 base + LoRA), ``qlora`` (bitsandbytes NF4 base with double quantization and bf16 compute,
  k-bit preparation, loaded on this rank's own device) and ``full`` (every language-model weight trains; for
  small models and planning); gradient checkpointing is non-reentrant, which gives frozen-base LoRA its gradients
  without any input-gradient hook, so a frozen vision tower is never back-propagated through;
* **encoding** an :class:`~rmpl_ds.example.Example` into input ids, attention mask, labels (loss on the target
  and its end-of-turn token only) and pixel inputs: images are resized to the paper's 512×512 first, then go
  through the family's own image processor (PIL backend, no torchvision), and the chat template's image
  placeholder is expanded to exactly the number of tokens the official processor would emit;
* **naming** its modules: LoRA targets (language-model attention and MLP projections), the vision tower, the
  projector/merger and what stays unquantized under QLoRA;
* **exporting** LoRA adapters in PEFT format and merged full checkpoints (QLoRA: dequantize, merge, bf16).

Heavy libraries (torch, transformers, peft, bitsandbytes) are imported inside the methods, so importing this
module (e.g. for :class:`LoraSettings` in the recipe layer) stays cheap.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from rmpl_ds.constants import IGNORE_INDEX
from rmpl_ds.errors import UserError
from rmpl_ds.log import get_logger

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from rmpl_ds.collate import Collator
    from rmpl_ds.example import Example

logger = get_logger(__name__)

Mode = Literal["lora", "qlora", "full"]
MODES: tuple[Mode, ...] = ("lora", "qlora", "full")


# The paper's image protocol: every image is resized to 512×512 before the family's own preprocessing.
PAPER_IMAGE_SIZE = 512

# Language-model linear layers LoRA may target (attention, then MLP); the default is all seven.
LM_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SequenceTooLongError(UserError):
    """An example whose prompt (system + user turn + image tokens) alone does not fit ``max_seq_len``."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters, as the recipe's ``model.lora`` section gives them.

    Attributes:
        rank: LoRA rank r (> 0).
        alpha: scaling numerator; the update is scaled by alpha / rank.
        dropout: dropout on the LoRA input, in [0, 1).
        targets: which language-model projections get adapters (names from :data:`LM_PROJECTIONS`);
            ``None`` means all seven.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank must be > 0, got {self.rank}")
        if self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            unknown = [name for name in self.targets if name not in LM_PROJECTIONS]
            if unknown or not self.targets:
                problems.append(
                    f"targets must be a non-empty subset of {list(LM_PROJECTIONS)}, got {list(self.targets)}"
                )
        if problems:
            raise UserError("LoRA settings: " + "; ".join(problems))

    @property
    def projections(self) -> tuple[str, ...]:
        """The targeted projection names (all seven when ``targets`` is None)."""
        return LM_PROJECTIONS if self.targets is None else tuple(self.targets)


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the adapter needs; all of them exist in every tokenizer of the family (real or tiny).

    Attributes:
        pad: the padding id (``<|endoftext|>`` in all three families).
        end_of_turn: the token that closes an assistant turn (``<|im_end|>``); the last labelled token.
        stop: ids that end greedy generation.
        image: the placeholder the model overwrites with image features, repeated once per image token.
        image_start: the token opening an image span.
        image_end: the token closing an image span.
    """

    pad: int
    end_of_turn: int
    stop: tuple[int, ...]
    image: int
    image_start: int
    image_end: int


@dataclass(frozen=True)
class ImageInputs:
    """The family image processor's output for the images of one example.

    Attributes:
        tensors: model keyword arguments (``pixel_values``, plus ``image_grid_thw`` for the Qwen families).
        tokens_per_image: how many placeholder tokens each image expands to, in order.
    """

    tensors: dict[str, torch.Tensor]
    tokens_per_image: tuple[int, ...]


@dataclass(eq=False)
class ProcessorBundle:
    """Everything needed to turn Examples into model inputs for one loaded checkpoint (no model weights).

    Built by :meth:`BackboneAdapter.load_processor` (cheap: data-loader workers use it without a model) and
    returned with the model by :meth:`BackboneAdapter.load`. Picklable.

    Attributes:
        adapter: the family adapter that made it.
        path: the checkpoint directory.
        tokenizer: the checkpoint's tokenizer.
        image_processor: the family image processor (PIL backend), its size limits capped at ``max_image_tokens``.
        config: the checkpoint's model config.
        special: the token ids the adapter uses.
        image_size: the side of the square protocol resize (the paper's 512); ``None`` keeps images as given.
        max_image_tokens: the cap on image tokens per image the image processor was configured with.
        extra: family-specific settings derived at load (InternVL: ``tokens_per_tile``).
    """

    adapter: BackboneAdapter
    path: Path
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    config: PretrainedConfig
    special: SpecialTokenIds
    image_size: int | None
    max_image_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(
        self, example: Example, *, max_seq_len: int, with_target: bool = True, max_target_tokens: int | None = None
    ) -> dict[str, Any]:
        """Shortcut for :meth:`BackboneAdapter.encode` with this bundle."""
        return self.adapter.encode(
            self, example, max_seq_len=max_seq_len, with_target=with_target, max_target_tokens=max_target_tokens
        )

    def sequence_length(self, example: Example, *, max_seq_len: int, with_target: bool = True) -> int:
        """Shortcut for :meth:`BackboneAdapter.sequence_length` with this bundle."""
        return self.adapter.sequence_length(self, example, max_seq_len=max_seq_len, with_target=with_target)

    def image_token_count(self, width: int, height: int) -> int:
        """Image tokens for an image of this size as the image processor sees it (after the protocol resize)."""
        return self.adapter.image_token_count(width, height, bundle=self)

    def dummy_image_inputs(self) -> dict[str, Any]:
        """Shortcut for :meth:`BackboneAdapter.dummy_image_inputs` with this bundle."""
        return self.adapter.dummy_image_inputs(self)

    def collator(
        self, *, padding_side: Literal["right", "left"] = "right", pad_to_multiple_of: int | None = None
    ) -> Collator:
        """A :class:`~rmpl_ds.collate.Collator` for this tokenizer, with this family's dummy image for text-only
        micro-batches (so every rank runs the vision tower every step)."""
        from rmpl_ds.collate import Collator

        return Collator(
            pad_token_id=self.special.pad,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            dummy_image=self.dummy_image_inputs() if padding_side == "right" else None,
        )

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer (with its chat template) and the image processor settings into ``out_dir``."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        for name in ("preprocessor_config.json", "processor_config.json"):
            source = self.path / name
            if source.is_file() and source.resolve() != (out_dir / name).resolve():
                shutil.copyfile(source, out_dir / name)


class BackboneAdapter:
    """Base class of the family adapters; subclasses fill in the class attributes and the image hooks.

    Adapters are stateless: everything that depends on a checkpoint lives in its :class:`ProcessorBundle`.
    """

    family: ClassVar[str]
    # config.json's model_type; a directory of another family is refused at load.
    model_type: ClassVar[str]
    # transformers class name; looked up on the transformers package (no auto-class guessing).
    model_class_name: ClassVar[str]
    # transformers image processor class (PIL backend), used for the full-size reference settings.
    image_processor_class_name: ClassVar[str]
    # the full-size config in rmpl_ds/model_configs/ and the published checkpoint it describes.
    full_size_config: ClassVar[str]
    hub_name: ClassVar[str]
    # the published preprocessor_config.json values (for token counts without the weights).
    reference_preprocessor: ClassVar[dict[str, Any]]
    # The chat template the adapter renders with, for real and tiny checkpoints alike: owned by the code, equal to
    # the published template for system / user (images, text) / assistant turns, so a checkpoint's own template
    # (default system prompts, thinking blocks, tool syntax) can never shift where the labels start.
    chat_template: ClassVar[str]
    # what the chat template writes for one image, before expansion.
    template_image_placeholder: ClassVar[str]
    image_token: ClassVar[str]
    image_start_token: ClassVar[str]
    image_end_token: ClassVar[str]
    end_of_turn_token: ClassVar[str] = "<|im_end|>"
    pad_token: ClassVar[str] = "<|endoftext|>"
    # module paths, relative to the HF model (not the PEFT wrapper)
    language_model_prefix: ClassVar[str] = "model.language_model"
    vision_tower_prefix: ClassVar[str]
    projector_modules: ClassVar[tuple[str, ...]]
    # regex (relative to the vision tower prefix) of the ViT linears LoRA targets when the tower trains
    vision_lora_pattern: ClassVar[str]
    # modules kept in bf16 under QLoRA: the LM head (as bitsandbytes' default), the vision tower and projector;
    # transformers matches these as module-path prefixes from the model's root (or as suffixes)
    quantization_skip_modules: ClassVar[tuple[str, ...]]
    # default cap on image tokens per image; the paper's 512×512 stays well below it in every family
    default_max_image_tokens: ClassVar[int] = 1280
    # Qwen's M-RoPE needs a per-token modality id (0 text, 1 image); InternVL has plain RoPE
    uses_mm_token_type_ids: ClassVar[bool] = False
    # the family tokenizer's special tokens (the tiny tokenizers get exactly these), and the ones a processor
    # reads by attribute name (InternVL's ``context_image_token`` ...)
    special_tokens: ClassVar[tuple[str, ...]]
    named_special_tokens: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ family hooks

    def configure_image_processor(self, image_processor: Any, max_image_tokens: int, config: Any) -> dict[str, Any]:
        """Cap the image processor at ``max_image_tokens`` per image (in place); return bundle extras."""
        raise NotImplementedError

    def process_images(self, bundle: ProcessorBundle, images: Sequence[Image.Image]) -> ImageInputs:
        """Run the family image processor on already protocol-resized RGB images."""
        raise NotImplementedError

    def image_token_count(self, width: int, height: int, *, bundle: ProcessorBundle | None = None) -> int:
        """Image tokens (without the start/end markers) for one ``width``×``height`` image, as the official
        processor counts them; ``bundle=None`` uses the full-size checkpoint's published processor settings."""
        raise NotImplementedError

    def reference_image_processor(self) -> Any:
        """The published checkpoint's image processor (its preprocessor_config.json values), capped at the
        default image-token cap; no weights or files needed."""
        raise NotImplementedError

    def tiny_config_dict(self, token_ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
        """config.json of the offline tiny variant: the full-size config with small widths and depths."""
        raise NotImplementedError

    def tiny_preprocessor(self) -> dict[str, Any]:
        """preprocessor_config.json of the tiny variant."""
        raise NotImplementedError

    def tiny_processor_config(self) -> dict[str, Any] | None:
        """processor_config.json of the tiny variant, where the family ships one."""
        return None

    def image_span(self, special: SpecialTokenIds, n_tokens: int) -> list[int]:
        """The token ids one image occupies in the final sequence, markers included."""
        return [special.image_start, *([special.image] * n_tokens), special.image_end]

    # ------------------------------------------------------------------ names and counts

    def lm_lora_pattern(self, projections: Sequence[str] = LM_PROJECTIONS) -> str:
        """Regex (PEFT ``target_modules``, full-matched against module paths) for the language model's
        attention and MLP projections; never matches a vision-tower linear even where names coincide."""
        attention = [name for name in projections if name in LM_PROJECTIONS[:4]]
        mlp = [name for name in projections if name in LM_PROJECTIONS[4:]]
        alternatives = []
        if attention:
            alternatives.append(rf"self_attn\.(?:{'|'.join(attention)})")
        if mlp:
            alternatives.append(rf"mlp\.(?:{'|'.join(mlp)})")
        return rf"{re.escape(self.language_model_prefix)}\.layers\.\d+\.(?:{'|'.join(alternatives)})"

    def lora_targets(self, settings: LoraSettings | None = None, *, train_vision_tower: bool = False) -> str:
        """PEFT ``target_modules`` regex: the LM projections of ``settings`` (+ the ViT linears when the vision
        tower trains in a LoRA mode)."""
        settings = settings or LoraSettings()
        pattern = self.lm_lora_pattern(settings.projections)
        if train_vision_tower:
            pattern += rf"|{re.escape(self.vision_tower_prefix)}\.{self.vision_lora_pattern}"
        return pattern

    def is_vision_tower_parameter(self, name: str) -> bool:
        """True for a vision-tower parameter (its projector/merger excluded); ``name`` is relative to the HF model."""
        return _under(name, self.vision_tower_prefix) and not self.is_projector_parameter(name)

    def is_projector_parameter(self, name: str) -> bool:
        """True for a projector/merger parameter; ``name`` is relative to the HF model."""
        return any(_under(name, prefix) for prefix in self.projector_modules)

    def full_size_config_dict(self) -> dict[str, Any]:
        """The published checkpoint's config.json, shipped in ``rmpl_ds/model_configs/``."""
        text = resources.files("rmpl_ds").joinpath("model_configs", self.full_size_config).read_text()
        return json.loads(text)

    def model_class(self) -> type[PreTrainedModel]:
        """The family's transformers model class."""
        import transformers

        return getattr(transformers, self.model_class_name)

    def config_from_dict(self, config_dict: dict[str, Any]) -> PretrainedConfig:
        """A config object of the family's config class from a config.json dictionary."""
        from transformers import AutoConfig

        config_class = type(AutoConfig.for_model(self.model_type))
        return config_class.from_dict(config_dict)

    def meta_parameter_count(self) -> int:
        """Parameters of the full-size architecture, counted by instantiating its config on the meta device."""
        import torch

        config = self.config_from_dict(self.full_size_config_dict())
        with torch.device("meta"):
            model = self.model_class()._from_config(config)
        return sum(parameter.numel() for parameter in model.parameters())

    # ------------------------------------------------------------------ loading

    def load_processor(
        self,
        path: str | Path,
        *,
        image_size: int | None = PAPER_IMAGE_SIZE,
        max_image_tokens: int | None = None,
    ) -> ProcessorBundle:
        """Tokenizer + image processor + config of a local checkpoint directory (no weights are read).

        Args:
            path: a local HF directory (config.json, tokenizer files, preprocessor_config.json).
            image_size: side of the square protocol resize applied before the family preprocessing
                (``None`` keeps images as given).
            max_image_tokens: cap on image tokens per image (default: the family's ``default_max_image_tokens``);
                the image processor's own limits still apply when they are lower (tiny models).

        Raises:
            UserError: ``path`` is not a local model directory, or is one of another family.
        """
        model_dir = self.resolve_model_dir(path)
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir)
        if config.model_type != self.model_type:
            raise UserError(
                f"{model_dir}: config.json has model_type {config.model_type!r}, but backbone {self.family!r} "
                f"expects {self.model_type!r}; pick the backbone that matches the checkpoint"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The PIL backend on every host: identical pixels on the CPU test machine and the GPU hosts, and no
        # torchvision import (it cannot be installed next to the CPU torch build).
        image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        cap = max_image_tokens if max_image_tokens is not None else self.default_max_image_tokens
        if cap <= 0:
            raise UserError(f"max_image_tokens must be > 0, got {cap}")
        extra = self.configure_image_processor(image_processor, cap, config)
        special = self._special_token_ids(tokenizer, model_dir)
        self._check_config_token_ids(config, special, model_dir)
        return ProcessorBundle(
            adapter=self,
            path=model_dir,
            tokenizer=tokenizer,
            image_processor=image_processor,
            config=config,
            special=special,
            image_size=image_size,
            max_image_tokens=cap,
            extra=extra,
        )

    def load(
        self,
        path: str | Path,
        mode: Mode,
        *,
        lora: LoraSettings | None = None,
        train_vision_tower: bool = False,
        train_projector: bool = False,
        gradient_checkpointing: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        zero_stage: int | None = None,
        image_size: int | None = PAPER_IMAGE_SIZE,
        max_image_tokens: int | None = None,
        attn_implementation: str | None = None,
        random_init: bool = False,
    ) -> tuple[PreTrainedModel, ProcessorBundle]:
        """Load a local checkpoint for training in ``mode`` and return ``(model, bundle)``.

        Args:
            path: local HF directory; a hub name is refused (nothing is ever downloaded).
            mode: ``lora``, ``qlora`` or ``full``.
            lora: LoRA hyperparameters (lora/qlora; default :class:`LoraSettings`).
            train_vision_tower: lora/qlora: LoRA on the ViT linears too; full: the ViT weights train.
            train_projector: the projector/merger trains fully (saved with the adapter in lora/qlora).
            gradient_checkpointing: non-reentrant activation checkpointing (no input-gradient hooks: nothing frozen
                is back-propagated through unless a trainable parameter lies before it).
            dtype: weight dtype (default bf16); under qlora the bf16 compute dtype of the 4-bit layers.
            device: where this rank's copy goes (default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU);
                the whole model lands there, never ``device_map="auto"``.
            zero_stage: the DeepSpeed ZeRO stage the model will train under, when known; qlora refuses 3.
            image_size, max_image_tokens: see :meth:`load_processor`.
            attn_implementation: e.g. ``"sdpa"`` or ``"flash_attention_2"``; default: transformers' choice.
            random_init: build the architecture of ``path``'s config.json with random weights instead of reading a
                checkpoint (benchmarks of full-size models where no weights exist; see :meth:`_random_model`); the
                same modes, LoRA and checkpointing follow.

        Returns:
            The model in train mode (a ``PeftModel`` in lora/qlora) with ``config.use_cache = False``, and the
            processor bundle.

        Raises:
            UserError: bad path, family mismatch, unknown mode, or qlora under ZeRO-3.
        """
        import torch

        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
        if mode == "qlora" and zero_stage == 3:
            raise UserError(
                "qlora cannot train under ZeRO stage 3 here: ZeRO-3 would shard the 4-bit base weights, which needs "
                "bitsandbytes quant-storage handling this package does not do (and ZeRO-3 buys nothing at 7-8B on "
                "two GPUs); use ZeRO stage 2 (ds_configs/zero2.json) or lora mode"
            )
        if mode == "full" and lora is not None:
            logger.debug("mode full ignores the LoRA settings")
        dtype = dtype or torch.bfloat16
        bundle = self.load_processor(path, image_size=image_size, max_image_tokens=max_image_tokens)
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
                llm_int8_skip_modules=list(self.quantization_skip_modules),
            )
        if random_init:
            model = self._random_model(bundle, load_kwargs)
        else:
            model = self.model_class().from_pretrained(bundle.path, **load_kwargs)
        # No KV cache in training (checkpointing would turn it off anyway, with a warning per forward).
        model.config.use_cache = False
        model.config.get_text_config().use_cache = False

        if mode == "full":
            self._set_trainable_full(model, train_vision_tower=train_vision_tower, train_projector=train_projector)
            if gradient_checkpointing:
                self._enable_gradient_checkpointing(model)
            model.train()
            return model, bundle

        from peft import LoraConfig, get_peft_model

        if mode == "qlora":
            from peft import prepare_model_for_kbit_training

            # Freezes the base and upcasts the non-4-bit weights (norms, LM head, vision) to fp32 for stable
            # training; checkpointing is switched on below, the same way as in lora mode.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            _keep_one_4bit_layout(model)
        else:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
        if gradient_checkpointing:
            self._enable_gradient_checkpointing(model)
        settings = lora or LoraSettings()
        peft_config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=self.lora_targets(settings, train_vision_tower=train_vision_tower),
            modules_to_save=self._projector_module_names(model) if train_projector else None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        # PEFT hooks the input embeddings of every sub-model of a non-quantized base (for reentrant checkpointing,
        # which is not used here); see _enable_gradient_checkpointing.
        _drop_input_grad_hooks(model.get_base_model())
        model.train()
        return model, bundle

    def _random_model(self, bundle: ProcessorBundle, load_kwargs: dict[str, Any]) -> PreTrainedModel:
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
            model = self.model_class()._from_config(bundle.config, dtype=load_kwargs["dtype"], **extra)
        if "quantization_config" not in load_kwargs:
            return model
        weights = model.state_dict()
        del model
        quantized = self.model_class().from_pretrained(None, config=bundle.config, state_dict=weights, **load_kwargs)
        del weights
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return quantized

    @staticmethod
    def resolve_model_dir(path: str | Path) -> Path:
        """The checkpoint directory ``path`` names, or a UserError saying how to provide the weights."""
        model_dir = Path(path).expanduser()
        if model_dir.is_dir() and (model_dir / "config.json").is_file():
            return model_dir.resolve()
        if model_dir.is_dir():
            raise UserError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
        raise UserError(
            f"{str(path)!r} is not a local model directory. This package never downloads weights: fetch the "
            "checkpoint once on a machine with hub access (e.g. `hf download Qwen/Qwen2-VL-7B-Instruct --local-dir "
            "models/Qwen2-VL-7B-Instruct`; the hf command comes with huggingface_hub) and pass its path; for a tiny "
            "offline model to try things with, `rmpl-ds demo-data --out DIR --tiny-model MODEL_DIR`"
        )

    # ------------------------------------------------------------------ encoding

    def render(self, bundle: ProcessorBundle, example: Example, *, with_target: bool) -> str:
        """The chat text of ``example``: with the target turn, or ending in the generation prompt."""
        return bundle.tokenizer.apply_chat_template(
            example.messages(with_target=with_target),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=not with_target,
        )

    def encode(
        self,
        bundle: ProcessorBundle,
        example: Example,
        *,
        max_seq_len: int,
        with_target: bool = True,
        max_target_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Tokenize one example for training (``with_target``) or for generation (the prompt only).

        The loss covers the target's tokens and the end-of-turn token that closes it; the system turn, the user
        turn (text and image tokens) and the template's trailing newline are masked with ``IGNORE_INDEX``.
        A sequence longer than ``max_seq_len``, or a target of more than ``max_target_tokens`` labelled tokens,
        loses its tail: the dropped target tokens are counted (``n_target_tokens_dropped``), flagged
        (``truncated``) and logged, never silently cut.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` (training only), ``mm_token_type_ids`` (Qwen families),
            the pixel inputs (``pixel_values`` and, for Qwen, ``image_grid_thw``; absent without images) as
            tensors, and the plain values ``image_tokens`` (per image), ``n_target_tokens`` (labelled tokens
            kept), ``n_target_tokens_dropped``, ``truncated``, ``length`` and ``key``.

        Raises:
            SequenceTooLongError: the prompt alone does not leave room for one target token (or, for generation,
                does not fit); the message names the example and the lengths.
        """
        import torch

        images = [self.protocol_resize(image, bundle.image_size) for image in example.images]
        image_inputs = self.process_images(bundle, images) if images else None
        tokens_per_image = image_inputs.tokens_per_image if image_inputs else ()
        prompt_ids, answer_ids, n_labelled = self._token_ids(bundle, example, tokens_per_image, with_target)
        self._check_prompt_fits(example, len(prompt_ids), tokens_per_image, max_seq_len, with_target)
        input_ids = prompt_ids + answer_ids
        labels = (
            [IGNORE_INDEX] * len(prompt_ids) + answer_ids[:n_labelled] + [IGNORE_INDEX] * (len(answer_ids) - n_labelled)
        )
        limit, limit_name = max_seq_len, f"max_seq_len={max_seq_len}"
        capped = max_target_tokens is not None and n_labelled > max_target_tokens
        if capped and len(prompt_ids) + max_target_tokens < limit:
            limit, limit_name = len(prompt_ids) + max_target_tokens, f"max_target_tokens={max_target_tokens}"
        truncated = len(input_ids) > limit
        n_dropped = 0
        if truncated:
            n_dropped = sum(1 for label in labels[limit:] if label != IGNORE_INDEX)
            input_ids, labels = input_ids[:limit], labels[:limit]
            logger.warning(
                "example %r (source %r, task %r) truncated to %s: %d of %d target tokens dropped",
                example.key,
                example.source,
                example.task,
                limit_name,
                n_dropped,
                n_labelled,
            )

        ids = torch.tensor(input_ids, dtype=torch.long)
        encoded: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_target:
            encoded["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.uses_mm_token_type_ids:
            encoded["mm_token_type_ids"] = (ids == bundle.special.image).to(torch.int32)
        if image_inputs is not None:
            encoded.update(image_inputs.tensors)
        encoded.update(
            image_tokens=tokens_per_image,
            n_target_tokens=n_labelled - n_dropped,
            n_target_tokens_dropped=n_dropped,
            truncated=truncated,
            length=len(input_ids),
            key=example.key,
        )
        return encoded

    def sequence_length(
        self, bundle: ProcessorBundle, example: Example, *, max_seq_len: int, with_target: bool = True
    ) -> int:
        """``encode(...)["length"]`` without processing any pixels: image token counts depend only on image sizes.
        Cheap enough for a sampler that groups a step's samples by length before encoding them. Raises as
        :meth:`encode` does."""
        sizes = [
            image.size if bundle.image_size is None else (bundle.image_size, bundle.image_size)
            for image in example.images
        ]
        tokens_per_image = tuple(self.image_token_count(width, height, bundle=bundle) for width, height in sizes)
        prompt_ids, answer_ids, _ = self._token_ids(bundle, example, tokens_per_image, with_target)
        self._check_prompt_fits(example, len(prompt_ids), tokens_per_image, max_seq_len, with_target)
        return min(len(prompt_ids) + len(answer_ids), max_seq_len)

    def _token_ids(
        self, bundle: ProcessorBundle, example: Example, tokens_per_image: Sequence[int], with_target: bool
    ) -> tuple[list[int], list[int], int]:
        """(prompt ids with expanded image spans, answer ids, how many answer ids carry labels)."""
        prompt_text = self.render(bundle, example, with_target=False)
        prompt_ids = self._expand_placeholders(bundle, self._tokenize(bundle, prompt_text), tokens_per_image, example)
        if not with_target:
            return prompt_ids, [], 0
        full_text = self.render(bundle, example, with_target=True)
        if not full_text.startswith(prompt_text):
            raise RuntimeError(
                f"{self.family} chat template renders the prompt differently with and without the answer; "
                "labels cannot be placed"
            )
        answer_ids = self._tokenize(bundle, full_text[len(prompt_text) :])
        # Label the target up to and including its end-of-turn token; what the template adds after it (a newline)
        # is not something the model must learn to emit.
        ends = [index for index, token in enumerate(answer_ids) if token == bundle.special.end_of_turn]
        return prompt_ids, answer_ids, ends[-1] + 1 if ends else len(answer_ids)

    @staticmethod
    def _check_prompt_fits(
        example: Example, prompt_length: int, tokens_per_image: Sequence[int], max_seq_len: int, with_target: bool
    ) -> None:
        room_for_target = 1 if with_target else 0
        if prompt_length + room_for_target > max_seq_len:
            raise SequenceTooLongError(
                f"example {example.key!r} (source {example.source!r}, task {example.task!r}): the prompt is "
                f"{prompt_length} tokens ({sum(tokens_per_image)} of them image tokens), which leaves no room for "
                f"the target within max_seq_len={max_seq_len}; raise max_seq_len or shorten the prompt"
            )

    def dummy_image_inputs(self, bundle: ProcessorBundle) -> dict[str, Any]:
        """A minimal black image as an encoded fragment: ``input_ids`` (its image span), ``mm_token_type_ids``
        (Qwen) and pixel inputs. The collator appends it, masked and unlabelled, to a micro-batch that has no
        image, so the vision tower (and its collectives under ZeRO) runs on every rank every step while the
        loss and the real tokens' outputs stay unchanged."""
        import torch
        from PIL import Image

        image_inputs = self.process_images(bundle, [Image.new("RGB", self.dummy_image_size(bundle), (0, 0, 0))])
        ids = torch.tensor(self.image_span(bundle.special, image_inputs.tokens_per_image[0]), dtype=torch.long)
        fragment: dict[str, Any] = {"input_ids": ids, **image_inputs.tensors}
        if self.uses_mm_token_type_ids:
            fragment["mm_token_type_ids"] = (ids == bundle.special.image).to(torch.int32)
        return fragment

    def dummy_image_size(self, bundle: ProcessorBundle) -> tuple[int, int]:
        """(width, height) of the dummy image: the smallest the image processor accepts without upscaling."""
        raise NotImplementedError

    @staticmethod
    def protocol_resize(image: Image.Image, image_size: int | None) -> Image.Image:
        """The paper's preprocessing: RGB, resized to ``image_size``×``image_size`` (bicubic)."""
        from PIL import Image as PILImage

        image = image.convert("RGB") if image.mode != "RGB" else image
        if image_size is None or image.size == (image_size, image_size):
            return image
        return image.resize((image_size, image_size), PILImage.Resampling.BICUBIC)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        model: Any,
        bundle: ProcessorBundle,
        examples: Sequence[Example],
        *,
        max_new_tokens: int = 256,
        max_seq_len: int = 4096,
        batch_size: int = 8,
    ) -> list[str]:
        """Greedy answers for ``examples`` (their targets are ignored), decoded without special tokens.

        Batches are left-padded; the model's train/eval mode is restored afterwards.
        """
        import torch
        from transformers import GenerationConfig

        from rmpl_ds.collate import Collator, model_inputs

        collator = Collator(pad_token_id=bundle.special.pad, padding_side="left")
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=list(bundle.special.stop),
            pad_token_id=bundle.special.pad,
            use_cache=True,
        )
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        answers: list[str] = []
        try:
            for start in range(0, len(examples), batch_size):
                encoded = [
                    self.encode(bundle, example, max_seq_len=max_seq_len, with_target=False)
                    for example in examples[start : start + batch_size]
                ]
                inputs = {key: value.to(device) for key, value in model_inputs(collator(encoded)).items()}
                with torch.no_grad():
                    output = model.generate(**inputs, generation_config=generation_config)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers.extend(bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            model.train(was_training)
        return answers

    # ------------------------------------------------------------------ export

    def export_adapter(self, model: Any, out_dir: str | Path, bundle: ProcessorBundle | None = None) -> Path:
        """Save the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors), plus the
        tokenizer and image-processor settings when ``bundle`` is given; ``PeftModel.from_pretrained(base, out_dir)``
        loads it. Written to a temporary sibling and renamed, so a half-written directory never looks complete.

        Raises:
            UserError: ``model`` has no LoRA adapter (full mode: use :meth:`merge_and_export`).
        """
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise UserError(
                "export_adapter needs a lora/qlora model; a full-mode model is exported with merge_and_export"
            )
        with atomic_directory(out_dir) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            if bundle is not None:
                bundle.save(staging)
        return Path(out_dir)

    def merge_and_export(
        self,
        model: Any,
        out_dir: str | Path,
        bundle: ProcessorBundle | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write a full HF checkpoint (``dtype``, default bf16) that :meth:`load` reads in any mode.

        lora: the adapter is merged into the base weights. qlora: the NF4 base is dequantized first (the weights
        the adapter was trained against), then merged. full: saved as is. Tokenizer and image-processor settings
        go along when ``bundle`` is given. The model is consumed (merged in place): reload to train further.
        """
        import torch
        from peft import PeftModel

        dtype = dtype or torch.bfloat16
        _refuse_to_overwrite(out_dir)  # before the model is consumed
        if isinstance(model, PeftModel):
            if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
                merged = self._dequantize_and_merge(model, dtype)
            else:
                merged = model.merge_and_unload()
        else:
            merged = model
        merged = merged.to(dtype)
        merged.config.use_cache = True
        merged.config.get_text_config().use_cache = True
        with atomic_directory(out_dir) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            if bundle is not None:
                bundle.save(staging)
        return Path(out_dir)

    # ------------------------------------------------------------------ helpers

    def _tokenize(self, bundle: ProcessorBundle, text: str) -> list[int]:
        return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand_placeholders(
        self, bundle: ProcessorBundle, ids: list[int], tokens_per_image: Sequence[int], example: Example
    ) -> list[int]:
        """Replace each image placeholder the template wrote with the image's full token span."""
        placeholder = self._tokenize(bundle, self.template_image_placeholder)
        expanded: list[int] = []
        image_index = 0
        position = 0
        width = len(placeholder)
        while position < len(ids):
            if ids[position : position + width] == placeholder:
                if image_index >= len(tokens_per_image):
                    break
                expanded.extend(self.image_span(bundle.special, tokens_per_image[image_index]))
                image_index += 1
                position += width
            else:
                expanded.append(ids[position])
                position += 1
        n_image_ids = sum(1 for token in ids if token == bundle.special.image)
        if image_index != len(tokens_per_image) or n_image_ids != len(tokens_per_image):
            raise UserError(
                f"example {example.key!r} (source {example.source!r}): {len(tokens_per_image)} image(s) but the "
                f"rendered prompt has {n_image_ids} image placeholder token(s) ({self.image_token!r}); "
                "the prompt or system text must not contain image tokens"
            )
        return expanded

    def _special_token_ids(self, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> SpecialTokenIds:
        names = {
            "pad": self.pad_token,
            "end_of_turn": self.end_of_turn_token,
            "image": self.image_token,
            "image_start": self.image_start_token,
            "image_end": self.image_end_token,
        }
        ids: dict[str, int] = {}
        missing = []
        vocab = tokenizer.get_vocab()
        for role, token in names.items():
            if token not in vocab:
                missing.append(token)
            else:
                ids[role] = vocab[token]
        if missing:
            raise UserError(f"{model_dir}: the tokenizer lacks the {self.family} special tokens {missing}")
        stop = tuple(dict.fromkeys([ids["end_of_turn"], ids["pad"]]))
        return SpecialTokenIds(stop=stop, **ids)

    def _check_config_token_ids(self, config: PretrainedConfig, special: SpecialTokenIds, model_dir: Path) -> None:
        if config.image_token_id != special.image:
            raise UserError(
                f"{model_dir}: config.json image_token_id={config.image_token_id} but the tokenizer maps "
                f"{self.image_token!r} to {special.image}; the tokenizer does not belong to this checkpoint"
            )

    def _projector_module_names(self, model: Any) -> list[str]:
        """The projector as PEFT ``modules_to_save`` entries: module lists (Qwen3-VL's DeepStack mergers) by item,
        since PEFT copies single modules only."""
        import torch

        names = []
        for prefix in self.projector_modules:
            module = model.get_submodule(prefix)
            if isinstance(module, torch.nn.ModuleList):
                names.extend(f"{prefix}.{index}" for index in range(len(module)))
            else:
                names.append(prefix)
        return names

    def _set_trainable_full(self, model: Any, *, train_vision_tower: bool, train_projector: bool) -> None:
        for name, parameter in model.named_parameters():
            if self.is_projector_parameter(name):
                parameter.requires_grad_(train_projector)
            elif self.is_vision_tower_parameter(name):
                parameter.requires_grad_(train_vision_tower)
            else:
                parameter.requires_grad_(True)

    def _enable_gradient_checkpointing(self, model: Any) -> None:
        # Non-reentrant checkpointing recomputes a block from saved-tensor hooks, so a block whose inputs come from
        # frozen layers still gives its trainable weights (LoRA, or whatever trains) their gradients: nothing needs
        # an input that requires grad. transformers' activation_checkpointing_enable (and PEFT's wrapper, see
        # _drop_input_grad_hooks) nevertheless hook *every* sub-model's input embeddings to require grad, the
        # vision patch embedding included, which makes backward run through the whole frozen vision tower. The
        # hooks are removed: input gradients flow only where a trainable parameter puts them.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _drop_input_grad_hooks(model)

    def _dequantize_and_merge(self, model: Any, dtype: torch.dtype) -> Any:
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


def _drop_input_grad_hooks(model: Any) -> None:
    """Remove the input-embedding hooks that ``enable_input_require_grads`` registered on ``model`` (an HF model).

    transformers keeps only the hooks of its latest call, so this runs right after each call that may add them
    (activation checkpointing, PEFT wrapping), never after two of them.
    """
    model.disable_input_require_grads()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve_device(device: Any) -> Any:
    import torch

    from rmpl_ds import dist

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def _refuse_to_overwrite(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; refusing to overwrite an export")


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging directory next to ``out_dir`` (which must be absent or empty); rename it into place on
    success, delete it on failure, so a half-written model directory never looks complete."""
    out_dir = Path(out_dir)
    _refuse_to_overwrite(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
