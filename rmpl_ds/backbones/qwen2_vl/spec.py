"""Qwen/Qwen2-VL-7B-Instruct: Qwen2-7B language model, 675 M-parameter ViT (14-px patches) with a 2×2 merger.

Images go through ``Qwen2VLImageProcessorPil``, which resizes to multiples of 28 px (512 → 504): a 36×36 patch grid,
**324** image tokens after the 2×2 merge. Grounding (the model card's "grounding" examples and the tokenizer's
special tokens): ``<|object_ref_start|>Agent<|object_ref_end|><|box_start|>(121,100),(412,998)<|box_end|>`` on a
0-1000 grid of the image's width and height.
"""

from rmpl_ds.backbones.qwen_vl import (
    QWEN2_VL_PREPROCESSOR,
    QWEN_IMAGE_TOKENS,
    QWEN_SPECIAL_TOKENS,
    merge_geometry,
    qwen_chat_template,
)
from rmpl_ds.backbones.spec import FamilySpec
from rmpl_ds.grounding import QWEN2_VL

SPEC = FamilySpec(
    name="qwen2-vl",
    model_type="qwen2_vl",
    model_class="Qwen2VLForConditionalGeneration",
    hub_name="Qwen/Qwen2-VL-7B-Instruct",
    size_name="qwen2-vl-7b",
    full_size_config="Qwen2-VL-7B-Instruct.json",
    parameters=8_291_375_616,
    projector_modules=("model.visual.merger",),
    vision_lora_pattern=r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))",
    quantization_skip_modules=("lm_head", "model.visual"),
    reference_preprocessor=QWEN2_VL_PREPROCESSOR,
    **QWEN_IMAGE_TOKENS,
    chat_template=qwen_chat_template(default_system="You are a helpful assistant."),
    special_tokens=QWEN_SPECIAL_TOKENS,
    box_syntax=QWEN2_VL,
    vision_geometry=merge_geometry,
)
