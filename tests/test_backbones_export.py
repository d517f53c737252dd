"""Exports of the tiny variants: PEFT adapters that PeftModel.from_pretrained loads, merged full checkpoints
(LoRA, QLoRA: dequantize + merge, full) that load() reads back, and batched greedy generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from rmpl_ds.backbones import FAMILIES, get_adapter
from rmpl_ds.backbones.adapter import ProcessorBundle
from rmpl_ds.backbones.loading import model_class
from rmpl_ds.collate import model_inputs
from rmpl_ds.config import LoraConfig
from rmpl_ds.errors import UserError
from rmpl_ds.evaluate.generate import generate
from rmpl_ds.example import Example

SYSTEM = "Extract events. Types: Conflict:Attack (Attacker, Target)."


def _examples() -> list[Example]:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 260, 3), dtype=np.uint8))
    return [
        Example("i", SYSTEM, "What happens in the image?", "Conflict:Attack | Attacker: [1,2,3,4]", (image,), key="i"),
        Example("t", SYSTEM, "Rebels attacked the village on Monday near Gaza.", "Conflict:Attack | attacked", key="t"),
    ]


def _batch(bundle: ProcessorBundle) -> dict[str, torch.Tensor]:
    return model_inputs(bundle.collator()([bundle.encode(example, max_seq_len=512) for example in _examples()]))


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _perturb_adapters(model: Any) -> None:
    """Fresh LoRA B matrices are zero (a no-op adapter); give them weights so exports carry something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _tensor_names(directory: Path, file_name: str) -> list[str]:
    with safe_open(directory / file_name, "pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_adapter_and_merged_exports_reproduce_the_model(
    family: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    adapter = get_adapter(family)
    base_dir = tiny_model_dir(family)
    model, bundle = adapter.load(base_dir, "lora", dtype=torch.float32, train_projector=True)
    _perturb_adapters(model)
    batch = _batch(bundle)
    trained = _logits(model, batch)
    base_only = _logits(model_class(adapter.spec).from_pretrained(base_dir, dtype=torch.float32), batch)
    assert (trained - base_only).abs().max() > 1e-2  # the adapter changes the outputs

    adapter_dir = adapter.export_adapter(model, tmp_path / "adapter", bundle)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        path.name for path in adapter_dir.iterdir()
    }
    fresh_base = model_class(adapter.spec).from_pretrained(base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    assert torch.allclose(_logits(reloaded, batch), trained, atol=1e-5)

    merged_dir = adapter.merge_and_export(model, tmp_path / "merged", bundle, dtype=torch.float32)
    assert not any(
        "lora_" in name or "modules_to_save" in name for name in _tensor_names(merged_dir, "model.safetensors")
    )
    merged, merged_bundle = adapter.load(merged_dir, "full", dtype=torch.float32)
    assert merged_bundle.special == bundle.special
    assert torch.allclose(_logits(merged, batch), trained, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qlora_exports(family: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from peft import PeftModel

    adapter = get_adapter(family)
    base_dir = tiny_model_dir(family)
    # fp32 compute keeps the comparison exact up to the NF4 weights themselves
    model, bundle = adapter.load(base_dir, "qlora", dtype=torch.float32, lora=LoraConfig(dropout=0.0))
    _perturb_adapters(model)
    batch = _batch(bundle)
    # training (grad) and evaluation (no-grad) compute with the same 4-bit weights: bitsandbytes' CPU inference
    # repacking, which would change them in place, is off
    exact = model(**batch).logits.detach().float()
    trained = _logits(model, batch)
    assert torch.equal(trained, exact)

    adapter_dir = adapter.export_adapter(model, tmp_path / "adapter", bundle)
    quantized_base, _ = adapter.load(base_dir, "qlora", dtype=torch.float32)
    quantized_base = quantized_base.unload()  # the same 4-bit base, without the fresh adapter
    reloaded = PeftModel.from_pretrained(quantized_base, adapter_dir)
    assert torch.allclose(_logits(reloaded, batch), trained, atol=1e-4)

    # dequantize + merge: a plain checkpoint computing what the 4-bit model with its adapter computed
    merged_dir = adapter.merge_and_export(model, tmp_path / "merged", bundle, dtype=torch.float32)
    assert "quantization_config" not in (merged_dir / "config.json").read_text()
    merged, _ = adapter.load(merged_dir, "full", dtype=torch.float32)
    assert torch.allclose(_logits(merged, batch), exact, atol=1e-4)
    unmerged_base = _logits(model_class(adapter.spec).from_pretrained(base_dir, dtype=torch.float32), batch)
    assert (unmerged_base - exact).abs().max() > 1e-2  # the NF4 base and the adapter both show

    # the default export dtype is bf16
    again, _ = adapter.load(base_dir, "qlora")
    bf16_dir = adapter.merge_and_export(again, tmp_path / "merged-bf16", bundle)
    assert '"dtype": "bfloat16"' in (bf16_dir / "config.json").read_text()
    with safe_open(bf16_dir / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"BF16"}  # noqa: SIM118


def test_full_mode_exports_a_checkpoint_but_no_adapter(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    adapter = get_adapter("qwen2-vl")
    model, bundle = adapter.load(tiny_model_dir("qwen2-vl"), "full", dtype=torch.float32)
    with pytest.raises(UserError, match="export_adapter needs a lora/qlora model"):
        adapter.export_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    batch = _batch(bundle)
    expected = _logits(model, batch)
    out = adapter.merge_and_export(model, tmp_path / "merged", bundle, dtype=torch.float32)
    reloaded, _ = adapter.load(out, "full", dtype=torch.float32)
    assert torch.equal(_logits(reloaded, batch), expected)
    with pytest.raises(UserError, match="not empty; refusing to overwrite"):
        adapter.merge_and_export(reloaded, out, bundle)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging directories left


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_greedy_generation_matches_one_at_a_time(family: str, tiny_model_dir: Callable[[str], Path]) -> None:
    adapter = get_adapter(family)
    model, bundle = adapter.load(tiny_model_dir(family), "lora", dtype=torch.float32)
    _perturb_adapters(model)
    examples = _examples()
    batched = generate(model, bundle, examples, max_new_tokens=6)
    single = [generate(model, bundle, [example], max_new_tokens=6)[0] for example in examples]
    assert batched == single
    assert all(isinstance(answer, str) and answer for answer in batched)
    assert model.training  # generation restores train mode


def test_qlora_merge_survives_cpu_inference_repacking(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """A 4-bit model that bitsandbytes already repacked for its CPU inference kernel (e.g. one loaded elsewhere and
    evaluated) still merges from its real weights, not from the repacked bytes."""
    import bitsandbytes as bnb

    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    adapter = get_adapter("qwen2-vl")
    model, bundle = adapter.load(tiny_model_dir("qwen2-vl"), "qlora", dtype=torch.float32)
    _perturb_adapters(model)
    expected = {}  # dequantized NF4 weight + scaled LoRA update, per adapted layer
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and name.endswith(".base_layer"):
            lora_layer = model.get_submodule(name.removesuffix(".base_layer"))
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            update = lora_layer.lora_B["default"].weight @ lora_layer.lora_A["default"].weight
            key = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            expected[key] = weight + lora_layer.scaling["default"] * update
            module.support_avx512bf16_for_cpu = True  # what bitsandbytes does by default on this CPU
    assert len(expected) == 14
    _logits(model, _batch(bundle))  # an eval-mode, no-grad forward: bitsandbytes repacks in place
    assert all(
        module.weight.quant_state.packing_format_for_cpu
        for module in model.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    )
    merged_dir = adapter.merge_and_export(model, tmp_path / "merged", bundle, dtype=torch.float32)
    merged = model_class(adapter.spec).from_pretrained(merged_dir, dtype=torch.float32).state_dict()
    assert max((merged[key] - value).abs().max().item() for key, value in expected.items()) < 1e-3
