"""OpenGVLab/InternVL3_5-8B-HF: InternViT-300M + pixel-shuffle MLP projector + Qwen3-8B language model.

Images are cut into 448×448 tiles by ``GotOcr2ImageProcessorPil`` with the tiling rule ``InternVLProcessor``
switches on (``crop_to_patches=True``): the grid whose aspect ratio is closest to the image's, moving to a larger
grid on ties while the image covers more than half of it, plus a thumbnail when there is more than one tile.
Each tile gives (448/14)² = 1024 patches, pixel-shuffled (0.5) to **256** tokens; a 512×512 image is one tile.
The chat template writes ``<IMG_CONTEXT>`` per image, expanded to ``<img>`` + 256·tiles × ``<IMG_CONTEXT>`` +
``</img>`` as ``InternVLProcessor.replace_image_token`` does. Grounding (InternVL's documentation, "grounding"; the
``<ref>``/``<box>`` special tokens of its tokenizer): ``<ref>Agent</ref><box>[[x1, y1, x2, y2]]</box>`` with
coordinates normalized to 0-1000.
"""

from typing import Any

from rmpl_ds.backbones.qwen3_vl.spec import QWEN3_SPECIAL_TOKENS
from rmpl_ds.backbones.spec import FamilySpec, VisionGeometry
from rmpl_ds.grounding import INTERNVL

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokens_per_tile(vision_image_size: Any, patch_size: Any, downsample_ratio: float) -> int:
    """Image tokens per tile: (tile / patch)² patches, pixel-shuffled by ``downsample_ratio`` in each direction."""
    return int((_first(vision_image_size) // _first(patch_size)) ** 2 * downsample_ratio**2)


def tile_geometry(hf_config: Any) -> VisionGeometry:
    """The planner's view of InternViT: one sequence of (tile / patch)² patches + CLS per tile."""
    vision = hf_config.vision_config
    return VisionGeometry(
        "tiles",
        depth=vision.num_hidden_layers,
        width=vision.hidden_size,
        mlp_width=vision.intermediate_size,
        heads=vision.num_attention_heads,
        patch=_first(vision.patch_size),
        tile=_first(vision.image_size),
        tokens_per_tile=tokens_per_tile(vision.image_size, vision.patch_size, hf_config.downsample_ratio),
    )


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


SPEC = FamilySpec(
    name="internvl3_5",
    model_type="internvl",
    model_class="InternVLForConditionalGeneration",
    hub_name="OpenGVLab/InternVL3_5-8B-HF",
    size_name="internvl3_5-8b",
    full_size_config="InternVL3_5-8B-HF.reconstructed.json",
    parameters=8_528_318_464,
    vision_tower_prefix="model.vision_tower",
    projector_modules=("model.multi_modal_projector",),
    vision_lora_pattern=(
        r"encoder\.layer\.\d+\.(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.(?:fc1|fc2))"
    ),
    quantization_skip_modules=("lm_head", "model.vision_tower", "model.multi_modal_projector"),
    image_processor_class="GotOcr2ImageProcessorPil",
    # preprocessor_config.json of the published checkpoint (ImageNet normalization, 448-px tiles, ≤ 12 tiles)
    reference_preprocessor={
        "size": {"height": 448, "width": 448},
        "crop_to_patches": False,
        "min_patches": 1,
        "max_patches": 12,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    },
    image_token="<IMG_CONTEXT>",
    image_start_token="<img>",
    image_end_token="</img>",
    template_image_placeholder="<IMG_CONTEXT>",
    chat_template=CHAT_TEMPLATE,
    # InternVL's tokenizer is Qwen3's plus the image and grounding markers; InternVLProcessor reads the named ones.
    special_tokens=(
        *QWEN3_SPECIAL_TOKENS,
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<video>",
    ),
    named_special_tokens={
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    },
    box_syntax=INTERNVL,
    vision_geometry=tile_geometry,
)
