"""Qwen/Qwen2.5-VL-7B-Instruct: the Qwen2.5-7B language model and a 670 M-parameter ViT with windowed attention.

The vision tower cuts 14-px patches and attends within 112-px windows (8 × 8 patches) except in blocks 7, 15, 23 and
31, which attend over the whole image; RMSNorm and a SwiGLU MLP replace Qwen2-VL's LayerNorm and GELU MLP, and a 2 × 2
merger feeds the language model. The image path is Qwen2-VL's (``Qwen2VLImageProcessorPil``, multiples of 28 px):
a 512 × 512 image becomes 504 × 504, a 36 × 36 patch grid, **324** image tokens.

Grounding (the Qwen2.5-VL technical report and cookbook, "spatial understanding"; the model card's grounding
examples): JSON objects ``{"bbox_2d": [x1, y1, x2, y2], "label": "Agent"}`` in **absolute pixels of the image the
model sees** (after the processor's resize), not on a 0-1000 grid; the canvas comes from the loaded image processor.
The full-size config (rmpl_ds/model_configs/Qwen2.5-VL-7B-Instruct.json) is reconstructed from the published
architecture (Qwen2-VL-7B's language model with a 128k context; the vision settings of transformers'
Qwen2_5_VLVisionConfig defaults, which are the 7B model's); instantiated on the meta device it has 8,292,166,656
parameters (7.616 B language model, 0.677 B vision tower and merger), the published 8.29 B.
"""

from rmpl_ds.backbones.qwen_vl import (
    QWEN2_5_EXTRA_TOKENS,
    QWEN2_VL_PREPROCESSOR,
    QWEN_IMAGE_TOKENS,
    QWEN_SPECIAL_TOKENS,
    merge_geometry,
    qwen_chat_template,
)
from rmpl_ds.backbones.spec import FamilySpec
from rmpl_ds.grounding import absolute_json

SPEC = FamilySpec(
    name="qwen2.5-vl",
    model_type="qwen2_5_vl",
    model_class="Qwen2_5_VLForConditionalGeneration",
    hub_name="Qwen/Qwen2.5-VL-7B-Instruct",
    size_name="qwen2.5-vl-7b",
    full_size_config="Qwen2.5-VL-7B-Instruct.json",
    parameters=8_292_166_656,
    projector_modules=("model.visual.merger",),
    vision_lora_pattern=r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))",
    quantization_skip_modules=("lm_head", "model.visual"),
    reference_preprocessor=QWEN2_VL_PREPROCESSOR,
    **QWEN_IMAGE_TOKENS,
    chat_template=qwen_chat_template(default_system="You are a helpful assistant."),
    special_tokens=(*QWEN_SPECIAL_TOKENS, *QWEN2_5_EXTRA_TOKENS),
    box_syntax=absolute_json("qwen2.5-vl"),
    vision_geometry=merge_geometry,
)
