"""The paper recipes: each carries the paper's settings, each variant differs from its parent only where it says,
the ablations and the mixing study have the intended streams and stages, and the memory planner fits every one of
them on 2 x 24 GB (RTX 4090).

test_config.py checks that every shipped recipe loads and validates; this file checks what they say.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from rmpl_ds.backbones import get_spec
from rmpl_ds.config import Recipe, StreamConfig, batch_plan, load_recipe, to_dict
from rmpl_ds.ds_config import load_ds_config, zero_stage
from rmpl_ds.plan import PlanSettings, check_fits, plan_memory, plan_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "launch" / "recipes"
# Every recipe but the demos (a tiny model on CPU ranks) is a run on 2 x 24 GB: RMPL's (the paper's protocol) and
# the other methods' training strategies on the same backbone (their own stages).
STRATEGY_RECIPES = ("xmtl_qwen2vl_7b.yaml", "pit_qwen2vl_7b.yaml", "joint_qwen2vl_7b.yaml")
FULL_SIZE_RECIPES = sorted(p for p in RECIPE_DIR.glob("*.yaml") if not p.name.startswith("demo"))
PAPER_RECIPES = [p for p in FULL_SIZE_RECIPES if p.name not in STRATEGY_RECIPES]
MAIN = "rmpl_qwen2vl_7b.yaml"

# file -> (family, checkpoint directory, image tokens of a 512x512 image, max_seq_len)
BACKBONE_RECIPES = {
    "rmpl_qwen2vl_7b.yaml": ("qwen2-vl", "Qwen2-VL-7B-Instruct", 324, 2048),
    "rmpl_qwen3vl_8b.yaml": ("qwen3-vl", "Qwen3-VL-8B-Instruct", 256, 2048),
    "rmpl_internvl3_5_8b.yaml": ("internvl3_5", "InternVL3_5-8B-HF", 256, 2048),
}
QLORA_RECIPES = {f"{Path(name).stem}_qlora.yaml": name for name in BACKBONE_RECIPES}
ABLATIONS = ("rmpl_qwen2vl_7b_warmup_no_re.yaml", "rmpl_qwen2vl_7b_no_warmup.yaml", "rmpl_qwen2vl_7b_re_in_stage2.yaml")
MIXING_STUDY = {"rmpl_qwen2vl_7b_mix_1_1_2.yaml": 2.0, "rmpl_qwen2vl_7b_mix_1_1_0.5.yaml": 0.5}

# The paper's protocol.
STAGE1 = {"steps": 400, "lr": 1e-5}
STAGE2 = {"steps": 800, "lr": 3e-5}
GLOBAL_BATCH, WORLD_SIZE, IMAGE_SIZE, GPU_MEM_GIB = 16, 2, 512, 24
# What "fits" means for a shipped recipe: room for the planner's own uncertainty, not just a total under the card.
MARGIN_GIB = 1.5


def recipe(name: str) -> Recipe:
    return load_recipe(RECIPE_DIR / name)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}``; lists are leaves, as they are under ``extends``."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(child: Recipe, parent: Recipe) -> set[str]:
    """Key paths (lists whole) where two recipes differ."""
    a, b = flatten(to_dict(child)), flatten(to_dict(parent))
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


def streams(stage: Any) -> dict[str, float]:
    return {stream.name: stream.weight for stream in stage.mixture}


def test_the_paper_recipes_are_shipped() -> None:
    names = {p.name for p in FULL_SIZE_RECIPES}
    expected = {*BACKBONE_RECIPES, *QLORA_RECIPES, *ABLATIONS, *MIXING_STUDY, *STRATEGY_RECIPES}
    assert expected <= names, sorted(expected - names)
    # Distinct names give distinct run directories (runs/{name}): no two recipes overwrite each other's runs.
    loaded = [recipe(name) for name in sorted(names)]
    assert len({r.name for r in loaded}) == len(loaded)
    assert len({r.out_dir() for r in loaded}) == len(loaded)


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_settings(path: Path) -> None:
    """LoRA or QLoRA, ZeRO-2, 2 GPUs, bf16, gradient checkpointing, 512x512, global batch 16, the stage schedule."""
    r = load_recipe(path)
    model = r.model
    assert model.mode in ("lora", "qlora") and model.lora.rank == 64
    assert (model.dtype, model.gradient_checkpointing, model.image_size) == ("bf16", True, IMAGE_SIZE)
    assert not (model.train_vision_tower or model.train_projector)
    assert (r.launch.gpus, r.launch.nodes, r.launch.world_size) == (WORLD_SIZE, 1, WORLD_SIZE)
    ds_config = load_ds_config(r.launch.deepspeed_config)
    assert zero_stage(ds_config) == 2
    assert "offload_optimizer" not in ds_config["zero_optimization"]
    # Each header names its own launch command.
    assert f"rmpl-ds pipeline launch/recipes/{path.name} --gpus 2" in path.read_text(encoding="utf-8")

    by_name = {stage.name: stage for stage in r.stages}
    assert set(by_name) in ({"stage1", "stage2"}, {"stage2"})
    assert r.stages[-1].name == "stage2"  # the pipeline evaluates the last stage
    for stage in r.stages:
        expected = STAGE1 if stage.name == "stage1" else STAGE2
        assert (stage.steps, stage.lr) == (expected["steps"], expected["lr"]), stage.name
        assert stage.global_batch == GLOBAL_BATCH
        assert batch_plan(stage.global_batch, stage.micro_batch, r.launch.world_size).global_batch == GLOBAL_BATCH
    if "stage1" in by_name:
        assert by_name["stage1"].init_from is None and by_name["stage2"].init_from == "stage1"
        assert {s.task for s in by_name["stage1"].mixture} <= {"t", "i", "r"}
    assert {s.task for s in by_name["stage2"].mixture} >= {"EM", "AR"}


@pytest.mark.parametrize("name", sorted(BACKBONE_RECIPES))
def test_backbone_recipes(name: str) -> None:
    """The three backbones run the same RMPL; only the model differs, and the image-token cap is the exact count."""
    family, checkpoint, image_tokens, max_seq_len = BACKBONE_RECIPES[name]
    r = recipe(name)
    assert (r.model.family, r.model.mode) == (family, "lora")
    assert r.model.path == str(ROOT / "models" / checkpoint)  # ../../models/... from launch/recipes
    assert (r.model.max_image_tokens, r.model.max_seq_len) == (image_tokens, max_seq_len)
    # The cap is what the family's processor makes of a 512x512 image, so no image is squeezed below it.
    full_size = get_spec(family).size_name
    assert plan_memory(PlanSettings(full_size, image_size=IMAGE_SIZE)).image_tokens == image_tokens
    stage1, stage2 = r.stages
    assert streams(stage1) == {"ace:t": 1.0, "swig:i": 1.0, "mnre:r": 1.0}
    assert streams(stage2) == {"ace:EM": 1.0, "swig:EM": 1.0, "ace:AR": 1.0, "swig:AR": 1.0}
    if name != MAIN:
        # the 8B recipes restate the stages with micro batch 1 (see test_the_largest_paper_batch_that_fits)
        changed = {"name", "model.family", "model.path", "model.max_image_tokens", "stages"}
        assert differences(r, recipe(MAIN)) == changed
        main = recipe(MAIN)
        assert r.stages == tuple(dataclasses.replace(stage, micro_batch=1) for stage in main.stages)


@pytest.mark.parametrize("name", sorted(QLORA_RECIPES))
def test_qlora_variants_differ_only_in_the_mode(name: str) -> None:
    qlora, lora = recipe(name), recipe(QLORA_RECIPES[name])
    assert qlora.model.mode == "qlora"
    assert differences(qlora, lora) == {"name", "model.mode"}


def test_warmup_without_re() -> None:
    """Stage I over ACE:t and SWiG:i only; Stage II as in RMPL."""
    main, ablation = recipe(MAIN), recipe("rmpl_qwen2vl_7b_warmup_no_re.yaml")
    assert differences(ablation, main) == {"name", "stages"}
    stage1, stage2 = ablation.stages
    assert streams(stage1) == {"ace:t": 1.0, "swig:i": 1.0}
    assert stage1 == dataclasses.replace(main.stage("stage1"), mixture=main.stage("stage1").mixture[:2])
    assert stage2 == main.stage("stage2")
    assert not any(s.source == "mnre" for stage in ablation.stages for s in stage.mixture)


def test_without_warmup() -> None:
    """RMPL's Stage II alone, from the base model."""
    main, ablation = recipe(MAIN), recipe("rmpl_qwen2vl_7b_no_warmup.yaml")
    assert differences(ablation, main) == {"name", "stages"}
    (only,) = ablation.stages
    assert only == dataclasses.replace(main.stage("stage2"), init_from=None)


def test_re_moved_to_stage2() -> None:
    """Stage I without RE; Stage II = RMPL's EM/AR plus MNRE r, with RMPL's relation sample budget."""
    main, ablation = recipe(MAIN), recipe("rmpl_qwen2vl_7b_re_in_stage2.yaml")
    assert differences(ablation, main) == {"name", "stages"}
    stage1, stage2 = ablation.stages
    assert stage1 == recipe("rmpl_qwen2vl_7b_warmup_no_re.yaml").stage("stage1")
    relations = StreamConfig(source="mnre", task="r", weight=0.8)
    assert stage2 == dataclasses.replace(main.stage("stage2"), mixture=(*main.stage("stage2").mixture, relations))

    def relation_samples(stage: Any) -> float:
        return stage.steps * stage.global_batch * streams(stage).get("mnre:r", 0) / sum(streams(stage).values())

    assert relation_samples(stage2) == pytest.approx(relation_samples(main.stage("stage1")))  # 2,133 each


@pytest.mark.parametrize("name", sorted(MIXING_STUDY))
def test_mixing_study(name: str) -> None:
    main, study = recipe(MAIN), recipe(name)
    assert differences(study, main) == {"name", "stages"}
    stage1, stage2 = study.stages
    assert streams(stage1) == {"ace:t": 1.0, "swig:i": 1.0, "mnre:r": MIXING_STUDY[name]}
    weighted = tuple(
        dataclasses.replace(s, weight=MIXING_STUDY[name]) if s.source == "mnre" else s
        for s in main.stage("stage1").mixture
    )
    assert stage1 == dataclasses.replace(main.stage("stage1"), mixture=weighted)
    assert stage2 == main.stage("stage2")


@pytest.mark.parametrize("path", FULL_SIZE_RECIPES, ids=lambda p: p.name)
def test_the_planner_predicts_every_stage_fits_two_24gb_gpus_with_margin(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prediction, not a measurement (bench/plan_vs_measured.md says how the planner is checked on a GPU)."""
    r = load_recipe(path)
    for stage in r.stages:
        plan = check_fits(r, WORLD_SIZE, gpu_mem_gib=GPU_MEM_GIB, stage=stage.name)
        assert plan.fits and plan.margin_gib >= MARGIN_GIB, (stage.name, plan.per_gpu_gib)


@pytest.mark.parametrize("name", sorted(BACKBONE_RECIPES))
def test_the_largest_paper_batch_that_fits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The headers' choice: the first of 2048 x 2, 2048 x 1, 1536 x 1 (tokens x micro batch) with the margin."""
    monkeypatch.chdir(ROOT)
    r = recipe(name)
    chosen = (r.model.max_seq_len, r.stages[0].micro_batch)
    for seq_len, micro_batch in ((2048, 2), (2048, 1), (1536, 1)):
        overrides = [f"model.max_seq_len={seq_len}", *(f"stages.{s.name}.micro_batch={micro_batch}" for s in r.stages)]
        plan = plan_recipe(load_recipe(RECIPE_DIR / name, overrides))
        if plan.margin_gib >= MARGIN_GIB:
            assert chosen == (seq_len, micro_batch), (plan.per_gpu_gib, plan.margin_gib)
            break
        assert chosen != (seq_len, micro_batch)
    assert {stage.micro_batch for stage in r.stages} == {chosen[1]}
    if name == MAIN:
        assert chosen == (2048, 2)  # the paper's own batch: 2 x 4 accumulation x 2 GPUs = 16


# ------------------------------------------------------------------------------- the other methods' strategies


def stream_set(stage: Any) -> set[tuple[str, str, float, float]]:
    return {(s.source, s.task, s.weight, s.loss_weight) for s in stage.mixture}


RMPL_STAGE2 = {("ace", "EM", 1.0, 1.0), ("swig", "EM", 1.0, 1.0), ("ace", "AR", 1.0, 1.0), ("swig", "AR", 1.0, 1.0)}


@pytest.mark.parametrize("name", STRATEGY_RECIPES)
def test_strategy_recipes_keep_rmpls_model_data_launch_and_evaluation(name: str) -> None:
    """A strategy changes stages, sources and prompts only: the same backbone, LoRA, batch, launch and scorer."""
    r, main = recipe(name), recipe(MAIN)
    changed = {key.split(".")[0] for key in differences(r, main)}
    assert changed <= {"name", "stages", "sources", "raw", "tasks"}, changed
    assert f"rmpl-ds pipeline launch/recipes/{name} --gpus 2" in (RECIPE_DIR / name).read_text(encoding="utf-8")
    assert {**main.sources} == {k: v for k, v in r.sources.items() if k in main.sources}
    for stage in r.stages:
        assert (stage.global_batch, stage.micro_batch) == (GLOBAL_BATCH, main.stages[0].micro_batch)


def test_xmtl_recipe() -> None:
    r = recipe("xmtl_qwen2vl_7b.yaml")
    mtl, pseudo = r.stages
    assert (mtl.name, mtl.init_from, pseudo.name, pseudo.init_from) == ("mtl", None, "pseudo", "mtl")
    assert stream_set(mtl) == RMPL_STAGE2  # X-MTL's four tasks, no warm-up stage
    assert stream_set(pseudo) == RMPL_STAGE2 | {("pseudo", "EM", 1.0, 0.5), ("pseudo", "AR", 1.0, 0.5)}  # beta 0.5
    for stage in (mtl, pseudo):
        assert (stage.loss_weighting.kind, stage.loss_weighting.temperature) == ("dwa", 0.5)  # X-MTL's alpha
    raw = r.raw["pseudo"]
    assert (raw.converter, raw.label_with, raw.threshold, raw.input) == ("pseudo", "mtl", 0.8, r.sources["pairs"])
    assert r.raw["pairs"].converter == "pairs"
    assert set(pseudo.eval.streams) == {"ace:EM", "swig:EM", "ace:AR", "swig:AR"}  # pseudo pairs have no dev split


def test_pit_recipe() -> None:
    r, main = recipe("pit_qwen2vl_7b.yaml"), recipe(MAIN)
    schema, stage1, stage2 = r.stages
    assert (schema.name, schema.init_from, stage1.init_from, stage2.init_from) == ("schema", None, "schema", "stage1")
    assert {(s.source, s.task) for s in schema.mixture} == {("schema", "ts"), ("swig", "vs")}
    assert r.tasks.schema_guided and r.raw["schema"].converter == "schema"
    assert Path(r.raw["schema"].input).is_file()  # the packaged ontology (launch/schema/m2e2_schema.json)
    assert dataclasses.replace(stage1, init_from=None) == main.stage("stage1")
    assert stage2 == main.stage("stage2")


def test_the_packaged_schema_file_is_the_ontology(tmp_path: Path) -> None:
    """launch/schema/m2e2_schema.json is what write_schema_file writes from rmpl_ds.ontology (regenerate it after
    changing a definition or a role there)."""
    from rmpl_ds.sources.schema import write_schema_file

    written = write_schema_file(tmp_path / "schema.json")
    assert written.read_bytes() == (ROOT / "launch" / "schema" / "m2e2_schema.json").read_bytes()


def test_joint_recipe() -> None:
    r, main = recipe("joint_qwen2vl_7b.yaml"), recipe(MAIN)
    assert r.stage("stage1") == main.stage("stage1")
    stage2 = r.stage("stage2")
    assert stream_set(stage2) == RMPL_STAGE2 | {("ace", "joint", 1.0, 1.0), ("swig", "joint", 1.0, 1.0)}
    assert dataclasses.replace(stage2, mixture=main.stage("stage2").mixture, eval=None) == dataclasses.replace(
        main.stage("stage2"), eval=None
    )


@pytest.mark.parametrize(
    ("name", "full"),
    [("demo_xmtl.yaml", "xmtl_qwen2vl_7b.yaml"), ("demo_pit.yaml", "pit_qwen2vl_7b.yaml"),
     ("demo_joint.yaml", "joint_qwen2vl_7b.yaml")],
)  # fmt: skip
def test_demo_variants_are_the_strategies_on_the_demo(name: str, full: str) -> None:
    """`make compare`'s recipes: the demo's model, data, batch and schedule, with the full recipe's stages, streams,
    loss weighting and prompts; each writes its own run directory."""
    demo, variant, strategy = recipe("demo.yaml"), recipe(name), recipe(full)
    changed = {key.split(".")[0] for key in differences(variant, demo)}
    assert changed <= {"name", "stages", "sources", "raw", "tasks", "output_dir"}, changed
    assert variant.out_dir() != demo.out_dir()
    assert [s.name for s in variant.stages] == [s.name for s in strategy.stages]
    for small, large in zip(variant.stages, strategy.stages, strict=True):
        assert (stream_set(small), small.init_from) == (stream_set(large), large.init_from)
        assert small.loss_weighting.kind == large.loss_weighting.kind
        assert small.micro_batch == demo.stages[0].micro_batch
    assert variant.tasks == strategy.tasks
    assert {(k, v.converter) for k, v in variant.raw.items()} >= {(k, v.converter) for k, v in strategy.raw.items()}


def test_a_pseudo_labelled_source_is_labelled_by_an_earlier_stage() -> None:
    from rmpl_ds.config import ConfigError

    path = RECIPE_DIR / "xmtl_qwen2vl_7b.yaml"
    cases = {
        "raw.pseudo.label_with=pseudo": "raw.pseudo.label_with: stage 'pseudo' must run before stage 'pseudo', the "
        "first that reads 'pseudo'",
        "raw.pseudo.label_with=nope": "raw.pseudo.label_with: must name the stage whose export labels the pairs, one "
        "of ['mtl', 'pseudo']",
        "raw.pseudo.threshold=0": "raw.pseudo.threshold: must be in (0, 1], got 0",
        "raw.pairs.label_with=mtl": "raw.pairs.label_with: only a pseudo-labelled source (converter: pseudo) has a "
        "labelling stage",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as error:
            load_recipe(path, [override])
        assert message in str(error.value), override
