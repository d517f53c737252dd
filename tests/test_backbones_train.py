"""Loading the tiny variants in every mode and training through them on CPU: forward/backward, which weights
train, 4-bit QLoRA layers, gradient checkpointing, and the dummy-image path for text-only micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rmpl_ds.backbones import FAMILIES, get_adapter
from rmpl_ds.backbones.loading import MODES, count_parameters
from rmpl_ds.collate import Collator, model_inputs
from rmpl_ds.errors import UserError
from rmpl_ds.example import Example

SYSTEM = "Extract events. Types: Conflict:Attack (Attacker, Target); Life:Die (Victim)."


def _examples() -> list[Example]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    return [
        Example(
            "i", SYSTEM, "What happens in the image?", "Conflict:Attack | Attacker: [1,2,300,400]", (image,), key="i"
        ),
        Example("t", SYSTEM, "Rebels attacked the village on Monday.", "Conflict:Attack | attacked", key="t"),
    ]


def _text_only() -> list[Example]:
    return [
        Example("t", SYSTEM, "Rebels attacked the village on Monday.", "Conflict:Attack | attacked", key="a"),
        Example("t", SYSTEM, "Two people died.", "Life:Die | died", key="b"),
    ]


def _prefixed(model: Any) -> Callable[[str], str]:
    """Parameter names of a PEFT-wrapped model, relative to the HF model (as the adapter names modules)."""
    return lambda name: name.removeprefix("base_model.model.")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_backward_in_every_mode(family: str, mode: str, tiny_model_dir: Callable[[str], Path]) -> None:
    adapter = get_adapter(family)
    model, bundle = adapter.load(tiny_model_dir(family), mode)
    batch = bundle.collator()([bundle.encode(example, max_seq_len=512) for example in _examples()])
    assert batch["stats"].images == 1 and not batch["stats"].dummy_image
    loss = model(**model_inputs(batch)).loss
    assert torch.isfinite(loss) and 5.0 < loss.item() < 12.0  # random init over a ~3.7k vocabulary: about ln(3.7k)
    loss.backward()

    relative = _prefixed(model)
    trainable = {relative(name): p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {relative(name): p for name, p in model.named_parameters() if not p.requires_grad}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for p in frozen.values())
    assert any(p.grad.abs().sum() > 0 for p in trainable.values())
    assert not any(adapter.spec.is_vision_tower_parameter(name) for name in trainable)  # frozen by default
    assert not any(adapter.spec.is_projector_parameter(name) for name in trainable)
    if mode == "full":
        assert all(name.startswith(("model.language_model.", "lm_head.")) for name in trainable)
        assert len(trainable) == sum(
            1 for name in frozen | trainable if name.startswith(("model.language_model.", "lm_head."))
        )
    else:
        assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
        # every LM projection of every layer has an adapter; nothing else does
        layers = bundle.config.get_text_config().num_hidden_layers
        assert len(trainable) == 2 * 7 * layers
        lora_b_grads = [p.grad.abs().sum() for name, p in trainable.items() if ".lora_B." in name]
        assert all(grad > 0 for grad in lora_b_grads)  # through checkpointed layers too

    # non-reentrant checkpointing on the language model's layers
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert checkpointed
    trainable_count, total_count = count_parameters(model)
    assert 0 < trainable_count < total_count


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qlora_weights_are_nf4_with_double_quantization(family: str, tiny_model_dir: Callable[[str], Path]) -> None:
    import bitsandbytes as bnb

    adapter = get_adapter(family)
    model, _ = adapter.load(tiny_model_dir(family), "qlora")
    relative = _prefixed(model)
    quantized = {
        relative(name): module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)
    }
    layers = model.config.get_text_config().num_hidden_layers
    assert len(quantized) == 7 * layers
    assert all(name.startswith(adapter.spec.language_model_prefix + ".layers.") for name in quantized)
    for module in quantized.values():
        weight = module.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
        assert weight.quant_state.quant_type == "nf4"
        assert weight.quant_state.nested  # double quantization of the absmax constants
        assert module.compute_dtype == torch.bfloat16
    # the vision tower, projector and LM head stay unquantized
    vision_linears = [
        relative(name)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and relative(name).startswith(adapter.spec.vision_tower_prefix)
    ]
    assert vision_linears
    assert not isinstance(model.get_base_model().lm_head, bnb.nn.Linear4bit)
    # 4-bit weights count as their unpacked size
    full_model, _ = adapter.load(tiny_model_dir(family), "lora")
    assert count_parameters(model)[1] == count_parameters(full_model)[1]


def test_qlora_under_zero3_is_refused(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(UserError, match=r"qlora cannot train under ZeRO stage 3.*ZeRO stage 2"):
        get_adapter("qwen2-vl").load(tiny_model_dir("qwen2-vl"), "qlora", zero_stage=3)
    with pytest.raises(UserError, match="unknown mode 'qat'"):
        get_adapter("qwen2-vl").load(tiny_model_dir("qwen2-vl"), "qat")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_only_batch_runs_the_vision_tower_without_changing_the_loss(
    family: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    adapter = get_adapter(family)
    model, bundle = adapter.load(
        tiny_model_dir(family), "full", train_vision_tower=True, train_projector=True, dtype=torch.float32
    )
    encoded = [bundle.encode(example, max_seq_len=512) for example in _text_only()]
    with_dummy = bundle.collator()(encoded)
    without_dummy = Collator(bundle.special.pad)(encoded)
    assert with_dummy["stats"].dummy_image and "pixel_values" in with_dummy
    assert "pixel_values" not in without_dummy
    assert with_dummy["stats"].real_tokens == without_dummy["stats"].real_tokens

    reference = model(**model_inputs(without_dummy)).loss
    loss = model(**model_inputs(with_dummy)).loss
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    visual = [
        (name, p)
        for name, p in model.named_parameters()
        if adapter.spec.is_vision_tower_parameter(name) or adapter.spec.is_projector_parameter(name)
    ]
    assert visual and all(p.requires_grad for _, p in visual)
    # every vision/projector weight took part in the backward pass (so ZeRO's gradient hooks fire on this rank)
    # and received exactly zero, so the dummy image teaches nothing
    assert all(p.grad is not None for _, p in visual), [name for name, p in visual if p.grad is None][:3]
    assert all(float(p.grad.abs().max()) == 0.0 for _, p in visual)
    language = [p for name, p in model.named_parameters() if name.startswith("model.language_model.")]
    assert any(float(p.grad.abs().max()) > 0 for p in language)


def test_vision_tower_and_projector_train_by_option_in_lora_mode(tiny_model_dir: Callable[[str], Path]) -> None:
    adapter = get_adapter("qwen3-vl")
    model, bundle = adapter.load(tiny_model_dir("qwen3-vl"), "lora", train_vision_tower=True, train_projector=True)
    relative = _prefixed(model)
    trainable = [relative(name) for name, p in model.named_parameters() if p.requires_grad]
    vision_lora = [name for name in trainable if name.startswith("model.visual.blocks.") and ".lora_" in name]
    assert len(vision_lora) == 2 * 4 * bundle.config.vision_config.depth
    # the merger and the DeepStack mergers train fully (PEFT modules_to_save copies)
    assert any(".merger." in name and "modules_to_save" in name for name in trainable)
    assert any(".deepstack_merger_list." in name and "modules_to_save" in name for name in trainable)
    batch = bundle.collator()([bundle.encode(example, max_seq_len=512) for example in _examples()])
    model(**model_inputs(batch)).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if p.requires_grad and "visual" in name]
    assert grads and all(grad is not None for grad in grads)
