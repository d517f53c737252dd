"""Qwen/Qwen3-VL-8B-Instruct: Qwen3-8B-style language model (interleaved M-RoPE), 576 M-parameter ViT.

The Qwen-VL image path with 16-px patches (factor 32, so 512 stays 512): a 32×32 patch grid, **256** image tokens
after the 2×2 merge. The merger and the three DeepStack mergers (which feed ViT layers 8/16/24 into the first LLM
layers) together form the projector. Grounding (the Qwen3-VL cookbook, "2D grounding"): JSON objects
``{"bbox_2d": [x1, y1, x2, y2], "label": "Agent"}`` with coordinates relative to the image on a 0-1000 grid.
"""

from rmpl_ds.backbones.qwen_vl import (
    QWEN_FIM_TOKENS,
    QWEN_IMAGE_TOKENS,
    QWEN_SPECIAL_TOKENS,
    merge_geometry,
    qwen_chat_template,
)
from rmpl_ds.backbones.spec import FamilySpec
from rmpl_ds.grounding import QWEN3_VL

QWEN3_SPECIAL_TOKENS: tuple[str, ...] = (
    *QWEN_SPECIAL_TOKENS,
    *QWEN_FIM_TOKENS,
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
)

SPEC = FamilySpec(
    name="qwen3-vl",
    model_type="qwen3_vl",
    model_class="Qwen3VLForConditionalGeneration",
    hub_name="Qwen/Qwen3-VL-8B-Instruct",
    size_name="qwen3-vl-8b",
    full_size_config="Qwen3-VL-8B-Instruct.json",
    parameters=8_767_123_696,
    projector_modules=("model.visual.merger", "model.visual.deepstack_merger_list"),
    vision_lora_pattern=r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:linear_fc1|linear_fc2))",
    quantization_skip_modules=("lm_head", "model.visual"),
    # preprocessor_config.json of the published checkpoint (min/max pixels as shortest/longest edge)
    reference_preprocessor={
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    **QWEN_IMAGE_TOKENS,
    # The Instruct model's template adds no default system turn (and no thinking block).
    chat_template=qwen_chat_template(default_system=None),
    special_tokens=QWEN3_SPECIAL_TOKENS,
    box_syntax=QWEN3_VL,
    vision_geometry=merge_geometry,
)
