"""The memory planner: exact parameter counts, the notes' worked estimate, DeepSpeed's ZeRO-2 estimator, the CLI.

The full-size configs are instantiated on the meta device once per session (the planner caches them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmpl_ds.cli import main
from rmpl_ds.config import load_recipe
from rmpl_ds.errors import ConfigError, UserError
from rmpl_ds.plan import (
    BACKBONES,
    COMPONENTS,
    DEFAULT_OVERLAP_COMM,
    DEFAULT_REDUCE_BUCKET_SIZE,
    GIB,
    MAX_MICRO_BATCH_SEARCH,
    MemoryPlan,
    PlanSettings,
    check_fits,
    count_parameters,
    load_backbone,
    lora_parameters,
    plan_memory,
    plan_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPE = ROOT / "launch" / "recipes" / "rmpl_qwen2vl_7b.yaml"
DEMO_RECIPE = ROOT / "launch" / "recipes" / "demo.yaml"

# The notes' worked estimates (MEMORY_AND_SPEED.md §3.3) use HF's "auto" reduce bucket (h^2 elements), one buffer.
NOTES_BUCKETS = {"qwen2-vl-7b": 3584**2, "qwen3-vl-8b": 4096**2, "internvl3_5-8b": 4096**2}

# A tiny Qwen2-VL: the real architecture class at a size that instantiates on the CPU in milliseconds.
TINY_QWEN2_VL = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny-qwen2-vl"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_QWEN2_VL))
    return model_dir


def notes_settings(backbone: str, seq_len: int, micro_batch: int, **changes: object) -> PlanSettings:
    """The setup of the notes' §3.3: LoRA r=64 (dropout 0.05) on all LLM linears, 2 GPUs, HF auto buckets, and
    HF's loss (logits for every position)."""
    base = PlanSettings(
        backbone=backbone,
        mode="lora",
        loss="full_logits",
        seq_len=seq_len,
        micro_batch=micro_batch,
        reduce_bucket_size=NOTES_BUCKETS[backbone],
        overlap_comm=False,
    )
    return dataclasses.replace(base, **changes)


def before_reserve(plan: MemoryPlan) -> float:
    # The notes' totals leave out the allocator's fragmentation; they judge fit against ~23.5 usable GiB instead.
    return plan.per_gpu_gib - plan.breakdown["allocator_reserve"]


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    ("backbone", "total", "language", "vision"),
    [
        # notes §1.5 (analytic counts, cross-checked against published numbers) and notes/CPU_PROBES.md
        ("qwen2-vl-7b", 8_291_375_616, 7_615_616_512, 675_759_104),
        ("qwen3-vl-8b", 8_767_123_696, 8_190_735_360, 576_388_336),
        ("internvl3_5-8b", 8_528_318_464, 8_190_735_360, 337_583_104),
    ],
)
def test_full_size_parameter_counts_are_exact(backbone: str, total: int, language: int, vision: int) -> None:
    counts = count_parameters(backbone)
    assert (counts.total, counts.language, counts.vision) == (total, language, vision)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_lora_count_is_rank_times_in_plus_out_of_the_seven_projections(backbone: str) -> None:
    _, config = load_backbone(backbone)
    text = config.get("text_config", config)
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = text["num_key_value_heads"] * text.get("head_dim", h // text["num_attention_heads"])
    q_out = text["num_attention_heads"] * text.get("head_dim", h // text["num_attention_heads"])
    # q, k, v, o, gate, up, down: in + out of each, by hand from the config.
    per_layer = (h + q_out) + 2 * (h + kv) + (q_out + h) + 2 * (h + inter) + (inter + h)
    assert lora_parameters(backbone, 64, None) == 64 * layers * per_layer
    assert lora_parameters(backbone, 8, ("q_proj", "v_proj")) == 8 * layers * ((h + q_out) + (h + kv))


def test_lora_counts_match_the_notes() -> None:
    # notes §1.5: 161.5 M (Qwen2-VL-7B) and 174.6 M (the 8B models) at r=64; r=8 is an eighth of it.
    assert round(lora_parameters("qwen2-vl-7b", 64, None) / 1e6, 1) == 161.5
    assert round(lora_parameters("qwen3-vl-8b", 64, None) / 1e6, 1) == 174.6
    assert round(lora_parameters("internvl3_5-8b", 64, None) / 1e6, 1) == 174.6
    assert lora_parameters("qwen2-vl-7b", 8, None) * 8 == lora_parameters("qwen2-vl-7b", 64, None)


def test_a_tiny_model_dir_counts_like_the_real_module(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    real = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_dir))
    counts = count_parameters(tiny_dir)
    assert counts.total == sum(p.numel() for p in real.parameters())
    assert counts.language == sum(
        p.numel() for n, p in real.named_parameters() if n.startswith(("model.language_model.", "lm_head."))
    )


@pytest.mark.slow
def test_lora_count_matches_peft_on_the_tiny_model(tiny_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from rmpl_ds.plan import DEFAULT_LORA_TARGETS

    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_dir))
    # Restrict to the language model the way the planner does (Qwen2-VL's ViT uses other names anyway).
    pattern = r".*language_model.*\.(" + "|".join(DEFAULT_LORA_TARGETS) + ")"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=pattern))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(tiny_dir, 4, None) == trainable


def test_unknown_lora_target_names_the_real_ones() -> None:
    with pytest.raises(UserError, match=r"\['qkv'\] match no Linear layer.*'down_proj'"):
        lora_parameters("qwen2-vl-7b", 8, ("q_proj", "qkv"))


# -------------------------------------------------------------------------------- the notes' worked estimate


def test_notes_worked_estimate_qwen2_vl_lora_r64() -> None:
    """notes §3.3: 15.44 weights + 1.65 adapter states + 0.02 bucket + 0.8 context + activations.

    Tolerance 0.2 GiB on totals: the notes round every term to 0.01-0.1 GiB, and the planner adds the frozen
    vision tower's forward transient (0.06 GiB) that the notes call negligible. Fit is judged with the planner's
    5 % allocator reserve on top, against the full 24 GiB.
    """
    plan = plan_memory(notes_settings("qwen2-vl-7b", 1024, 1))
    b = plan.breakdown
    assert b["weights"] == pytest.approx(15.44, abs=0.005)
    assert b["adapter_weights"] + b["gradients"] + b["optimizer_states"] == pytest.approx(1.65, abs=0.01)
    assert b["buckets"] == pytest.approx(0.02, abs=0.005)
    assert b["cuda_context"] == 0.8
    # 0.19 boundary + 0.29 layer + 1.45 logits = 1.9 GiB of LLM activations at 1024 tokens.
    assert b["activation_boundaries"] == pytest.approx(0.19, abs=0.005)
    assert b["activation_layers"] == pytest.approx(0.29, abs=0.005)
    assert b["logits"] == pytest.approx(1.45, abs=0.005)
    assert before_reserve(plan) == pytest.approx(19.9, abs=0.2)
    assert plan.fits and plan.per_gpu_gib < 21.5

    too_big = plan_memory(notes_settings("qwen2-vl-7b", 2048, 2))
    assert before_reserve(too_big) == pytest.approx(25.7, abs=0.2)
    assert not too_big.fits
    assert too_big.max_micro_batch == 1
    # ... and the notes' remedy: a fused linear + cross-entropy makes 2048 x 2 fit (20.2 GiB in the notes).
    fused = plan_memory(notes_settings("qwen2-vl-7b", 2048, 2, loss="fused"))
    assert before_reserve(fused) == pytest.approx(20.2, abs=0.3)
    assert fused.fits


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        # notes §3.3, HF loss: (seq, micro) -> total GiB before the allocator reserve
        ("qwen2-vl-7b", {(1024, 1): 19.9, (2048, 1): 21.8, (1024, 2): 21.8, (2048, 2): 25.7}),
        ("qwen3-vl-8b", {(1024, 1): 20.9, (2048, 1): 22.9, (1024, 2): 22.9, (2048, 2): 26.9}),
        ("internvl3_5-8b", {(1024, 1): 20.5, (2048, 1): 22.5, (1024, 2): 22.5, (2048, 2): 26.4}),
    ],
)
def test_notes_lora_tables(backbone: str, expected: dict[tuple[int, int], float]) -> None:
    for (seq_len, micro_batch), total in expected.items():
        plan = plan_memory(notes_settings(backbone, seq_len, micro_batch))
        assert before_reserve(plan) == pytest.approx(total, abs=0.2), (seq_len, micro_batch)
    assert not plan_memory(notes_settings(backbone, 2048, 2)).fits


def test_notes_qlora_table() -> None:
    # notes §3.3: NF4 weights 5.49 GiB; totals 9.9 / 11.8 / 15.7 GiB. Tolerance 0.3: the planner also counts the
    # 0.13 GiB dequantization buffer and the 0.06 GiB vision transient.
    plan = plan_memory(notes_settings("qwen2-vl-7b", 1024, 1, mode="qlora"))
    assert plan.breakdown["weights"] == pytest.approx(5.49, abs=0.01)
    assert before_reserve(plan) == pytest.approx(9.9, abs=0.3)
    assert before_reserve(plan_memory(notes_settings("qwen2-vl-7b", 2048, 1, mode="qlora"))) == pytest.approx(
        11.8, abs=0.3
    )
    assert before_reserve(plan_memory(notes_settings("qwen2-vl-7b", 2048, 2, mode="qlora"))) == pytest.approx(
        15.7, abs=0.3
    )


# ---------------------------------------------------------------------------------------- DeepSpeed agreement


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_full_fine_tuning_model_states_agree_with_deepspeed(backbone: str, gpus: int) -> None:
    """Full fine-tuning of every parameter: weights + gradients + optimizer states == DeepSpeed's ZeRO-2 estimate.

    Both are 2P + 18P/N bytes; the tolerance (1e-6 relative) only absorbs DeepSpeed's int() rounding.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = count_parameters(backbone).total
    full = PlanSettings(backbone, mode="full", gpus=gpus, train_vision_tower=True, train_projector=True)
    plan = plan_memory(full)
    assert plan.params.trainable == total
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    assert plan.model_state_gib * GIB == pytest.approx(gpu_bytes, rel=1e-6)
    _, offload_bytes = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=True)
    assert plan_memory(dataclasses.replace(full, offload=True)).model_state_gib * GIB == pytest.approx(offload_bytes)


def test_frozen_vision_tower_is_deepspeed_on_the_trainable_part_plus_bf16_weights() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = count_parameters("qwen2-vl-7b")
    plan = plan_memory(PlanSettings("qwen2-vl-7b", mode="full", gpus=2))
    assert plan.params.trainable == counts.language
    _, trainable_bytes = estimate_zero2_model_states_mem_needs(counts.language, num_gpus_per_node=2, cpu_offload=False)
    assert plan.model_state_gib * GIB == pytest.approx(trainable_bytes + 2 * counts.vision, rel=1e-6)
    assert not plan.fits and plan.max_micro_batch == 0


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=25, deadline=None)
@given(
    backbone=st.sampled_from(sorted(BACKBONES)),
    mode=st.sampled_from(["lora", "qlora", "full"]),
    gpus=st.integers(1, 8),
    gpu_mem=st.sampled_from([24.0, 48.0, 80.0]),
    seq_len=st.sampled_from([512, 1024, 2048, 4096]),
    rank=st.integers(1, 128),
    loss=st.sampled_from(["target_only", "full_logits", "fused"]),
)
def test_max_micro_batch_is_the_fitting_boundary(
    backbone: str, mode: str, gpus: int, gpu_mem: float, seq_len: int, rank: int, loss: str
) -> None:
    base = PlanSettings(backbone, mode=mode, gpus=gpus, gpu_mem_gib=gpu_mem, seq_len=seq_len, lora_rank=rank, loss=loss)
    plan = plan_memory(base)
    assert plan.per_gpu_gib == pytest.approx(sum(plan.breakdown.values()))
    assert plan.margin_gib == pytest.approx(gpu_mem - plan.per_gpu_gib)
    assert list(plan.breakdown) == list(COMPONENTS)
    best = plan.max_micro_batch
    if best:
        assert plan_memory(dataclasses.replace(base, micro_batch=best)).fits
    if best < MAX_MICRO_BATCH_SEARCH:  # the search stops there (and says so in a note)
        assert not plan_memory(dataclasses.replace(base, micro_batch=best + 1)).fits
    assert plan.fits == (best >= 1)


def test_memory_grows_with_every_knob() -> None:
    base = PlanSettings("qwen3-vl-8b", seq_len=1024)

    def total(**changes: object) -> float:
        return plan_memory(dataclasses.replace(base, **changes)).per_gpu_gib

    assert total(seq_len=2048) > total()
    assert total(micro_batch=2) > total()
    assert total(lora_rank=128) > total()
    assert total(gpus=1) > total() > total(gpus=8)
    assert total(mode="qlora") < total() < total(mode="full")
    assert total(gradient_checkpointing=False) > total()
    assert total(train_vision_tower=True) > total()
    assert total(loss="fused") < total() < total(loss="full_logits")
    assert total(target_tokens=512) > total()
    assert total(lora_dropout=0.0) < total()
    assert total(reduce_bucket_size=500_000_000) > total()


def test_image_tokens_follow_each_processor() -> None:
    # notes §1.4: 512 px -> 324 (Qwen2-VL, 504x504), 256 (Qwen3-VL), 256 (InternVL, one tile); InternVL switches to
    # a 2x2 grid plus a thumbnail (5 tiles, 1280 tokens) above about 634 px.
    assert plan_memory(PlanSettings("qwen2-vl-7b")).image_tokens == 324
    assert plan_memory(PlanSettings("qwen3-vl-8b")).image_tokens == 256
    assert plan_memory(PlanSettings("internvl3_5-8b")).image_tokens == 256
    assert plan_memory(PlanSettings("internvl3_5-8b", image_size=633)).image_tokens == 256
    tiled = plan_memory(PlanSettings("internvl3_5-8b", image_size=700))
    assert tiled.image_tokens == 1280
    assert any("5 tiles" in note for note in tiled.notes)


def test_bad_settings_are_all_reported_at_once() -> None:
    bad = PlanSettings("qwen2-vl-7b", gpus=0, seq_len=0, zero_stage=3, mode="qlora", dtype="fp32")
    with pytest.raises(ConfigError) as caught:
        plan_memory(bad)
    text = str(caught.value)
    for fragment in ("gpus: must be >= 1", "seq_len: must be >= 1", "zero_stage: the planner models", "qlora"):
        assert fragment in text
    with pytest.raises(UserError, match="not a known backbone"):
        plan_memory(PlanSettings("no-such-backbone"))


def test_defaults_match_the_shipped_zero2_config() -> None:
    zero = json.loads((ROOT / "rmpl_ds" / "ds_configs" / "zero2.json").read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] == DEFAULT_REDUCE_BUCKET_SIZE
    assert zero["overlap_comm"] == DEFAULT_OVERLAP_COMM


# --------------------------------------------------------------------------------------------------- recipes


def test_paper_recipe_plans_from_the_shipped_config_and_the_gate_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(PAPER_RECIPE)
    plan = plan_recipe(recipe)
    assert plan.backbone.startswith("qwen2-vl-7b (shipped config")
    assert (plan.settings.seq_len, plan.settings.micro_batch, plan.settings.reduce_bucket_size) == (2048, 2, 5e7)
    assert (plan.settings.loss, plan.settings.target_tokens) == ("target_only", 256)
    assert plan.fits and plan.max_micro_batch == 3
    assert check_fits(recipe, 2) == plan
    # The same batch with logits for every position is the notes' "does not fit" row (27.1 GiB): the gate refuses.
    reference = load_recipe(PAPER_RECIPE, ["model.loss=full_logits"])
    assert plan_recipe(reference).per_gpu_gib == pytest.approx(27.14, abs=0.01)
    assert plan_recipe(recipe, loss="full_logits") == plan_recipe(reference)
    assert not plan_recipe(reference).fits
    with pytest.raises(UserError, match=r"(?s)predicts .* GiB per GPU.*--force.*total per GPU"):
        check_fits(reference, 2)
    assert check_fits(reference, 2, force=True) == plan_recipe(reference)
    assert plan_recipe(reference, loss="fused").fits


def test_the_target_only_logits_term_follows_the_target_bound() -> None:
    """Logits + loss = projected positions x vocabulary x 10 B; target_only projects min(seq, bound) per sample."""
    vocab = 152_064
    for seq_len, micro_batch, bound in ((2048, 2, 256), (2048, 1, 100), (512, 3, 1024)):
        lean = plan_memory(PlanSettings("qwen2-vl-7b", seq_len=seq_len, micro_batch=micro_batch, target_tokens=bound))
        full = plan_memory(PlanSettings("qwen2-vl-7b", seq_len=seq_len, micro_batch=micro_batch, loss="full_logits"))
        assert lean.breakdown["logits"] * GIB == min(seq_len, bound) * micro_batch * vocab * 10
        assert full.breakdown["logits"] * GIB == seq_len * micro_batch * vocab * 10
        others = [key for key in COMPONENTS if key not in ("logits", "allocator_reserve")]
        assert [lean.breakdown[key] for key in others] == [full.breakdown[key] for key in others]
    # The figure: 4,096 tokens x 152,064 x 10 B = 5.80 GiB, down to 512 target positions = 0.73 GiB.
    assert full.settings.loss == "full_logits"
    paper_full = plan_memory(PlanSettings("qwen2-vl-7b", seq_len=2048, micro_batch=2, loss="full_logits"))
    paper_lean = plan_memory(PlanSettings("qwen2-vl-7b", seq_len=2048, micro_batch=2))
    assert round(paper_full.breakdown["logits"], 2) == 5.80 and round(paper_lean.breakdown["logits"], 2) == 0.73
    assert paper_lean.fits and paper_lean.margin_gib >= 1.5 and not paper_full.fits


def test_cli_compares_loss_paths(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--recipe", str(PAPER_RECIPE), "--compare-losses", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["settings"]["seq_len"], result["settings"]["micro_batch"]) == (2048, 2)
    assert result["fits"] and result["margin_gib"] >= 1.5
    rows = result["by_loss"]
    assert list(rows) == ["target_only", "full_logits", "fused"]
    assert rows["target_only"]["per_gpu_gib"] == pytest.approx(result["per_gpu_gib"], abs=1e-4)
    assert rows["full_logits"]["per_gpu_gib"] == pytest.approx(27.14, abs=0.01) and not rows["full_logits"]["fits"]
    assert main(["plan", "--recipe", str(PAPER_RECIPE), "--compare-losses"]) == 0
    out = capsys.readouterr().out
    assert "by loss path" in out and "target_only" in out and "<- this plan" in out and "DOES NOT FIT" in out


def test_demo_recipe_needs_its_tiny_model(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO_RECIPE, [f"model.path={tiny_dir.parent / 'not-built'}"])
    with pytest.raises(UserError, match=r"has no config\.json"):
        plan_recipe(recipe)
    plan = plan_recipe(load_recipe(DEMO_RECIPE, [f"model.path={tiny_dir}"]))
    assert plan.params.total == count_parameters(tiny_dir).total
    assert (plan.settings.micro_batch, plan.image_tokens, plan.fits) == (8, 64, True)


def test_family_must_match_the_config(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(DEMO_RECIPE, [f"model.path={tiny_dir}", "model.family=qwen3-vl"])
    with pytest.raises(UserError, match="expects model_type 'qwen3_vl'"):
        plan_recipe(recipe)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--backbone", "qwen2-vl-7b", "--mode", "lora", "--gpus", "2", "--gpu-mem-gb", "24"]
    assert main([*argv, "--seq-len", "1024", "--micro-batch", "1", "--zero", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"params", "per_gpu_gib", "breakdown", "fits", "max_micro_batch"} <= set(result)
    assert result["params"]["total"] == 8_291_375_616
    assert result["params"]["trainable"] == result["params"]["lora"] == 161_480_704
    assert result["fits"] is True and result["max_micro_batch"] == 5  # 2 with --loss full_logits
    assert result["per_gpu_gib"] == pytest.approx(sum(result["breakdown"].values()), abs=1e-3)


def test_cli_table_and_recipe(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["plan", "--backbone", "internvl3_5-8b", "--mode", "qlora", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "logits + loss" in out and "verdict: fits" in out
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--recipe", str(PAPER_RECIPE), "stages.stage2.micro_batch=4"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out  # stage2 now has micro batch 4, and the most demanding stage is planned
    assert main(["plan", "--recipe", str(PAPER_RECIPE), "--stage", "stage1", "stages.stage2.micro_batch=4"]) == 0
    assert "verdict: fits" in capsys.readouterr().out


def test_cli_refuses_setup_flags_with_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--recipe", str(PAPER_RECIPE), "--mode", "qlora", "--seq-len", "1024"]) == 2
    err = capsys.readouterr().err
    assert "--mode, --seq-len: the recipe describes the setup" in err
    assert "Traceback" not in err


def test_zero_stages_and_when_zero2_pays() -> None:
    """ZeRO-0 keeps every trainable state whole, ZeRO-1 partitions the optimizer, ZeRO-2 the gradients too."""
    lora = PlanSettings("qwen2-vl-7b", seq_len=2048, micro_batch=2)
    trainable = plan_memory(lora).params.trainable
    by_stage = {stage: plan_memory(dataclasses.replace(lora, zero_stage=stage)) for stage in (0, 1, 2)}
    zero0 = by_stage[0].breakdown
    assert zero0["gradients"] * GIB == pytest.approx(6 * trainable) and zero0["buckets"] == 0
    assert zero0["optimizer_states"] * GIB == pytest.approx(12 * trainable)
    assert by_stage[0].per_gpu_gib > by_stage[1].per_gpu_gib > by_stage[2].per_gpu_gib
    note = next(note for note in by_stage[2].notes if note.startswith("ZeRO-0 / 1 / 2"))
    assert "ZeRO-0 fits" in note and "launch.zero_stage=0" in note  # LoRA on 2 GPUs: a GiB is all ZeRO-2 saves
    full = plan_memory(PlanSettings("qwen2-vl-7b", mode="full", gpus=8, gpu_mem_gib=80))
    assert any("ZeRO-2 pays here" in note and "does not fit" in note for note in full.notes)
