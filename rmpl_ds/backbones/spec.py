"""A backbone family's facts, one frozen :class:`FamilySpec` per family (``rmpl_ds/backbones/<family>/``).

What a family is (model type and class, the published checkpoint and its full-size config), where its parts are
(the module layout, LoRA's target names), how it sees images (image processor, image tokens, how the planner
counts its vision tower), how it chats (template, special tokens, end of turn) and how it was pretrained to write a
box. The recipe checks (rmpl_ds.config), the memory planner (rmpl_ds.plan), the tiny offline models, evaluation and
``rmpl-ds smoke`` all read a family's spec; no other module holds a fact about a family. Importing it is cheap (no
torch, no transformers), so the recipe layer validates against it before anything heavy loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from rmpl_ds.grounding import BoxSyntax

# The seven linear projections of every supported language model, attention then MLP: LoRA's default targets.
LM_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class VisionGeometry:
    """How an image becomes patches and LLM tokens, and the vision tower's shape (for the memory planner).

    ``kind`` "merge": Qwen-VL (patches of ``patch`` px on a grid rounded to ``patch x merge``, ``merge^2`` patches per
    LLM token, one sequence per image). "tiles": InternVL (``tile`` px tiles, ``tokens_per_tile`` tokens and
    ``(tile / patch)^2`` patches plus a CLS token per tile, one sequence per tile).
    """

    kind: Literal["merge", "tiles"]
    depth: int
    width: int
    mlp_width: int
    heads: int
    patch: int
    merge: int = 1
    tile: int = 0
    tokens_per_tile: int = 0


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Everything the package knows about one backbone family.

    Attributes:
        name: the family's name in recipes and on the command line (``model.family``, ``--backbone``).
        model_type: ``config.json``'s ``model_type``; a directory of another type is refused.
        model_class: the transformers class, looked up by name (no auto-class guessing).
        hub_name: the published checkpoint (``hf download <hub_name>``).
        size_name: the full-size backbone's name in ``rmpl-ds plan --backbone``.
        full_size_config: the published config.json, in ``rmpl_ds/model_configs/``.
        parameters: the full-size model's parameter count, as the meta-device instantiation of that config counts
            it (the tests hold the two equal).
        language_model_prefix, vision_tower_prefix, projector_modules, lm_head: module paths relative to the HF
            model (not the PEFT wrapper); the projector lies under the vision tower in Qwen-VL.
        lora_targets: the language model's linear projections LoRA may target (a recipe's ``model.lora.targets``
            is checked against them; the default targets all).
        vision_lora_pattern: a regex, relative to the vision tower, of the ViT linears LoRA targets when the tower
            trains.
        quantization_skip_modules: what stays bf16 under QLoRA (the LM head, the vision tower and the projector).
        image_processor_class: the transformers image processor (PIL backend).
        reference_preprocessor: the published ``preprocessor_config.json`` values (token counts without weights).
        image_token, image_start_token, image_end_token: the placeholder repeated once per image token, and the
            markers around it; ``template_image_placeholder`` is what the chat template writes for one image.
        default_max_image_tokens: the default cap on image tokens per image.
        uses_mm_token_type_ids: M-RoPE needs a per-token modality id (the Qwen families).
        chat_template: the chat format the package renders with, for real and tiny checkpoints alike: equal to the
            published template for system / user (images, text) / assistant turns, so a checkpoint's own template
            (default system prompts, thinking blocks, tool syntax) can never shift where the labels start.
        end_of_turn_token, pad_token: the token that closes an assistant turn (the last labelled one) and padding.
        special_tokens: the tokenizer's special tokens (the tiny tokenizers get exactly these);
            ``named_special_tokens`` the ones a processor reads by attribute name.
        box_syntax: the grounding syntax the checkpoint was pretrained with (rmpl_ds.grounding; an absolute one gets
            its canvas from the loaded image processor).
        vision_geometry: the planner's view of the vision tower, from a transformers config of the family.
    """

    name: str
    model_type: str
    model_class: str
    hub_name: str
    size_name: str
    full_size_config: str
    parameters: int
    language_model_prefix: str = "model.language_model"
    vision_tower_prefix: str
    projector_modules: tuple[str, ...]
    lm_head: str = "lm_head"
    lora_targets: tuple[str, ...] = LM_PROJECTIONS
    vision_lora_pattern: str
    quantization_skip_modules: tuple[str, ...]
    image_processor_class: str
    reference_preprocessor: Mapping[str, Any]
    image_token: str
    image_start_token: str
    image_end_token: str
    template_image_placeholder: str
    default_max_image_tokens: int = 1280
    uses_mm_token_type_ids: bool = False
    chat_template: str
    end_of_turn_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"
    special_tokens: tuple[str, ...]
    named_special_tokens: Mapping[str, str] = field(default_factory=dict)
    box_syntax: BoxSyntax
    vision_geometry: Callable[[Any], VisionGeometry] = field(compare=False)

    @property
    def checkpoint_dir(self) -> str:
        """The published checkpoint's directory name (``Qwen2-VL-7B-Instruct``)."""
        return self.hub_name.rsplit("/", 1)[-1]

    def is_vision_tower_parameter(self, name: str) -> bool:
        """True for a vision-tower parameter (its projector excluded); ``name`` relative to the HF model."""
        return _under(name, self.vision_tower_prefix) and not self.is_projector_parameter(name)

    def is_projector_parameter(self, name: str) -> bool:
        """True for a projector parameter; ``name`` relative to the HF model."""
        return any(_under(name, prefix) for prefix in self.projector_modules)

    def is_language_parameter(self, name: str) -> bool:
        """True for a language-model or LM-head parameter; ``name`` relative to the HF model."""
        return _under(name, self.language_model_prefix) or _under(name, self.lm_head)

    def lora_target_problems(self, targets: Sequence[str] | None) -> list[str]:
        """What is wrong with a recipe's ``model.lora.targets`` for this family (nothing for ``None``: all of them)."""
        if targets is None:
            return []
        unknown = [name for name in targets if name not in self.lora_targets]
        if unknown or not targets:
            return [
                f"must be a non-empty subset of {self.name}'s language-model projections {list(self.lora_targets)}, "
                f"got {list(targets)}" + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
            ]
        return []

    def lora_pattern(self, targets: Sequence[str] | None = None, *, train_vision_tower: bool = False) -> str:
        """PEFT ``target_modules`` regex (full-matched against module paths): the language model's ``targets``
        projections (all by default), never a vision-tower linear where names coincide; plus the ViT linears when
        the vision tower trains in a LoRA mode."""
        projections = tuple(targets) if targets is not None else self.lora_targets
        attention = [name for name in projections if name in LM_PROJECTIONS[:4]]
        mlp = [name for name in projections if name in LM_PROJECTIONS[4:]]
        alternatives = []
        if attention:
            alternatives.append(rf"self_attn\.(?:{'|'.join(attention)})")
        if mlp:
            alternatives.append(rf"mlp\.(?:{'|'.join(mlp)})")
        pattern = rf"{re.escape(self.language_model_prefix)}\.layers\.\d+\.(?:{'|'.join(alternatives)})"
        if train_vision_tower:
            pattern += rf"|{re.escape(self.vision_tower_prefix)}\.{self.vision_lora_pattern}"
        return pattern

    def full_size_config_dict(self) -> dict[str, Any]:
        """The published checkpoint's config.json, shipped in ``rmpl_ds/model_configs/``."""
        text = resources.files("rmpl_ds").joinpath("model_configs", self.full_size_config).read_text()
        return json.loads(text)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
