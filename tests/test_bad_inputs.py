"""Bad inputs through the real entry points: each is refused with exit 2, the file (and line, key or member) named,
no traceback, and nothing half-written; damaged inputs stop a stage before any process or model starts; nothing
from a dataset or shard is ever unpickled or evaluated.

Fast: every refusal happens before the deepspeed launcher starts (the launcher-level faults are in
test_reliability.py). RELIABILITY.md lists these tests next to the existing ones of the same family.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from rmpl_ds import handoff, train
from rmpl_ds.cli import main as cli
from rmpl_ds.config import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
# source -> (input, images, a whole JSON file a non-UTF-8 byte goes into), relative to the demo directory; MNRE's
# files are read line by line (LINE_FILES).
DEMO_INPUTS = {
    "ace": ("ace", None, "ace/train.json"),
    "swig": ("swig/SWiG_jsons", "swig/images_512", "swig/SWiG_jsons/train.json"),
    "imsitu": ("imsitu", "swig/images_512", "imsitu/train.json"),
    "mnre": ("mnre/mnre_txt", "mnre/img_org", None),
    "m2e2": ("m2e2/m2e2_annotations", "m2e2/image", "m2e2/m2e2_annotations/text_only_event.json"),
}
# Sources read as whole JSON documents, and every such file of them (relative to the demo directory).
WHOLE_FILE_SOURCES = tuple(source for source, (_, _, victim) in DEMO_INPUTS.items() if victim)
JSON_FILES = [
    ("ace", "ace/dev.json"),
    ("swig", "swig/SWiG_jsons/test.json"),
    ("swig", "swig/SWiG_jsons/imsitu_space.json"),
    ("imsitu", "imsitu/train.json"),
    ("imsitu", "imsitu/imsitu_space.json"),
    *(("m2e2", f"m2e2/m2e2_annotations/{kind}_event.json") for kind in ("text_only", "text_multimedia")),
    *(("m2e2", f"m2e2/m2e2_annotations/{kind}_event.json") for kind in ("image_only", "image_multimedia")),
]
# Line-oriented files: (source, file) -> the line a non-UTF-8 byte goes into.
LINE_FILES = {("mnre", "mnre/mnre_txt/mnre_train.txt"): 3, ("m2e2", "m2e2/m2e2_annotations/crossmedia_coref.txt"): 2}
TRAIN_SOURCES = ("ace", "swig", "mnre")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo raw data in the real formats and the shard sets of the three Stage I sources."""
    from rmpl_ds.sources.demo import write_demo

    base = tmp_path_factory.mktemp("bad-inputs")
    write_demo(base / "raw", seed=0, size=12)
    shards = base / "shards"
    for source in TRAIN_SOURCES:
        relative, images, _ = DEMO_INPUTS[source]
        argv = ["shards", "build", "--source", source, "--input", str(base / "raw" / relative)]
        argv += ["--out", str(shards / source)] + (["--images", str(base / "raw" / images)] if images else [])
        assert cli(argv) == 0
    return {"raw": base / "raw", "shards": shards}


def recipe_dict(model: Path | str, sources: dict[str, Path], *, lr: float = 2e-3) -> dict:
    stage = {"steps": 2, "lr": lr, "global_batch": 4, "micro_batch": 1, "checkpoint_every": 2}
    return {
        "name": "bad-inputs",
        "model": {"family": "qwen2-vl", "path": str(model), "mode": "lora", "max_seq_len": 512},
        "sources": {name: str(path) for name, path in sources.items()},
        "stages": [
            {
                "name": "stage1",
                "mixture": [{"source": s, "task": t, "weight": 1} for s, t in zip(TRAIN_SOURCES, "tir", strict=True)],
                **stage,
            },
            {
                "name": "stage2",
                "init_from": "stage1",
                "mixture": [{"source": s, "task": t, "weight": 1} for s, t in (("ace", "EM"), ("swig", "AR"))],
                **stage,
            },
        ],
        "launch": {"gpus": 2, "deepspeed_config": "zero2", "num_workers": 0},
    }


def write_recipe(path: Path, model: Path | str, sources: dict[str, Path], **changes: float) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(model, sources, **changes)))
    return path


def shard_copies(demo: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    copies = {}
    for source in TRAIN_SOURCES:
        copies[source] = tmp_path / "shards" / source
        shutil.copytree(demo["shards"] / source, copies[source])
    return copies


def refused(capsys: pytest.CaptureFixture[str], code: int) -> str:
    """The error text of a refused CLI call: exit 2, one message, no traceback."""
    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    return error


# ---------------------------------------------------------------------------------------------- raw data, recipes


def build_argv(source: str, raw: Path, images_root: Path, out: Path) -> list[str]:
    relative, images, _ = DEMO_INPUTS[source]
    argv = ["shards", "build", "--source", source, "--input", str(raw / relative), "--out", str(out)]
    return argv + (["--images", str(images_root / images)] if images else [])


def copy_raw(demo: dict[str, Path], tmp_path: Path) -> Path:
    """The demo's raw files without the images (the builds read those from the demo directory)."""
    raw = tmp_path / "raw"
    shutil.copytree(demo["raw"], raw, ignore=shutil.ignore_patterns("*.jpg", "*.png"))
    return raw


@pytest.mark.parametrize("source", WHOLE_FILE_SOURCES)
def test_a_non_utf8_json_file_is_refused_with_its_path_and_line(
    source: str, demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = copy_raw(demo, tmp_path)
    victim = raw / DEMO_INPUTS[source][2]
    data = victim.read_bytes()
    victim.write_bytes(data[:40] + b"\xff\xfe" + data[40:])
    out = tmp_path / "out"
    error = refused(capsys, cli(build_argv(source, raw, demo["raw"], out)))
    line = data[:40].count(b"\n") + 1
    assert f"{victim}:{line}: not UTF-8 text (invalid start byte at byte 40)" in error
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(("source", "relative"), JSON_FILES)
def test_a_truncated_json_file_is_refused_with_its_path_and_line(
    source: str, relative: str, demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A truncated text_only_event.json once built with exit 0, "malformed input: 1" and every sentence gone.
    raw = copy_raw(demo, tmp_path)
    victim = raw / relative
    text = victim.read_text()
    victim.write_text(text[: len(text) * 2 // 3])
    out = tmp_path / "out"
    error = refused(capsys, cli(build_argv(source, raw, demo["raw"], out)))
    assert f"{victim}:" in error and ": invalid JSON: " in error and "the file must parse as a whole" in error
    assert not out.exists()


@pytest.mark.parametrize(("source", "relative"), sorted(LINE_FILES))
def test_a_non_utf8_line_is_skipped_with_its_line_number(
    source: str, relative: str, demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One bad byte in an MNRE line once stopped the whole build with a byte offset and no line number.
    raw = copy_raw(demo, tmp_path)
    victim = raw / relative
    lines = victim.read_bytes().split(b"\n")
    number = LINE_FILES[(source, relative)]
    lines[number - 1] = lines[number - 1][:10] + b"\xff" + lines[number - 1][10:]
    victim.write_bytes(b"\n".join(lines))
    out = tmp_path / "out"
    assert cli(build_argv(source, raw, demo["raw"], out)) == 0
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skipped["total"] == 1
    (example,) = skipped["by_reason"]["not UTF-8 text"]["examples"]
    assert example == f"{victim}:{number}: not UTF-8 text: invalid start byte: byte 0xff at offset 10 of the line"
    capsys.readouterr()
    error = refused(capsys, cli([*build_argv(source, raw, demo["raw"], tmp_path / "strict"), "--strict"]))
    assert example in error and not (tmp_path / "strict").exists()


def test_a_non_utf8_recipe_is_refused_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"name: x\nmodel: {family: qwen2-vl, path: \xff\xfe}\n")
    assert f"{recipe}: cannot read recipe" in refused(capsys, cli(["check", str(recipe)]))
    error = refused(capsys, cli(["train", str(recipe), "--stage", "stage1", "--out", str(tmp_path / "run")]))
    assert f"{recipe}: cannot read recipe" in error and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ model directory


@pytest.mark.parametrize("kind", ["missing", "no-config", "broken-config"])
def test_train_refuses_a_model_directory_that_is_not_a_hugging_face_one(
    kind: str, demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    if kind != "missing":
        model.mkdir()
        (model / "weights.bin").write_bytes(b"\0" * 16)
    if kind == "broken-config":
        (model / "config.json").write_text("{not json")
    recipe = write_recipe(tmp_path / "recipe.yaml", model, {s: demo["shards"] / s for s in TRAIN_SOURCES})
    error = refused(capsys, cli(["train", str(recipe), "--stage", "stage1", "--out", str(tmp_path / "run")]))
    expected = {
        "missing": f"model.path: {model} does not exist. Download the weights once",
        "no-config": f"model.path: {model} has no config.json. Download the weights once",
        "broken-config": f"model.path: {model}: not a loadable Hugging Face qwen2-vl directory",
    }[kind]
    assert expected in error
    assert not (tmp_path / "run").exists()  # refused before the launcher started


# -------------------------------------------------------------------------------------------------- damaged shards


def _rewrite_tar(tar_path: Path, *, drop: str | None = None, add: tuple[str, bytes] | None = None) -> None:
    """Rewrite a shard's tar without member ``drop`` or with an extra member ``add`` (index and manifest untouched)."""
    members = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.name != drop:
                members.append((member, tar.extractfile(member).read()))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        if add is not None:
            info = tarfile.TarInfo(add[0])
            info.size = len(add[1])
            tar.addfile(info, io.BytesIO(add[1]))


def _damage(shard_dir: Path, damage: str) -> tuple[str, str]:
    """Damage the first shard of a set; returns (tar name, the member or phrase the refusal must name)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    tar_name = manifest["shards"][0]["file"]
    tar = shard_dir / tar_name
    index = json.loads((shard_dir / manifest["shards"][0]["index"]).read_text())
    key, members = index["samples"][2]
    if damage == "truncated":
        os.truncate(tar, tar.stat().st_size // 2)
        return tar_name, "truncated"
    if damage == "flipped-byte":
        offset, size, _ = members["json"]
        data = bytearray(tar.read_bytes())
        data[offset + size // 2] ^= 0x01
        tar.write_bytes(bytes(data))
        return tar_name, f"member {key}.json: bytes differ"
    if damage == "missing-member":
        _rewrite_tar(tar, drop=f"{key}.json")
        return tar_name, f"member {key}.json: listed in the index but missing from the tar"
    _rewrite_tar(tar, add=(f"{key}.pyd", pickle.dumps({"payload": 1})))
    return tar_name, f"member {key}.pyd: pickle-bearing"


DAMAGES = ["truncated", "flipped-byte", "missing-member", "pickle-member"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_train_refuses_damaged_shards_before_starting(
    damage: str, demo: dict[str, Path], tmp_path: Path, tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = shard_copies(demo, tmp_path)
    tar_name, phrase = _damage(sources["ace"], damage)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir("qwen2-vl"), sources)
    error = refused(capsys, cli(["train", str(recipe), "--stage", "stage1", "--out", str(tmp_path / "run")]))
    assert f"sources.ace: {sources['ace']} is damaged" in error
    assert f"{tar_name}: " in error and phrase in error
    assert not (tmp_path / "run").exists()  # no launcher, no rank, no step


def test_ranks_refuse_a_truncated_shard_before_joining_the_process_group(
    demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `deepspeed -m rmpl_ds.train` started by hand skips `rmpl-ds train`'s full verification; every rank still
    # checks manifests, indexes and tar sizes before anything else.
    import torch.distributed

    sources = shard_copies(demo, tmp_path)
    tar_name, _ = _damage(sources["swig"], "truncated")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "no-model-needed", sources)
    code = train.main([str(recipe), "--stage", "stage1", "--out", str(tmp_path / "run")])
    error = refused(capsys, code)
    assert f"{sources['swig'] / tar_name}: " in error and "truncated or replaced" in error
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------- Stage II hand-off (init_from)


def _export(run_dir: Path, recipe_data: dict, *, lose_a_file: bool = False) -> None:
    def write_model(directory: Path) -> None:
        (directory / "config.json").write_text('{"model_type": "qwen2_vl"}')
        (directory / "adapter_config.json").write_text("{}")

    handoff.write_export(
        run_dir / "stage1",
        write_model,
        recipe=recipe_from_dict(recipe_data),
        stage_name="stage1",
        step=2,
        kind="adapter",
        base_model="base",
    )
    if lose_a_file:
        (run_dir / "stage1" / "export" / "adapter_config.json").unlink()


@pytest.mark.parametrize("problem", ["missing", "partial", "other-recipe"])
def test_stage2_refuses_a_missing_partial_or_foreign_export(
    problem: str, demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.distributed

    sources = {s: demo["shards"] / s for s in TRAIN_SOURCES}
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "model", sources)
    run_dir = tmp_path / "run"
    if problem == "partial":
        _export(run_dir, recipe_dict(tmp_path / "model", sources), lose_a_file=True)
    elif problem == "other-recipe":
        _export(run_dir, recipe_dict(tmp_path / "model", sources, lr=1e-4))
    error = refused(capsys, train.main([str(recipe), "--stage", "stage2", "--out", str(run_dir)]))
    export = run_dir / "stage1" / "export"
    assert {
        "missing": f"{export}: the export of stage 'stage1' does not exist; run that stage first",
        "partial": f"{export / 'adapter_config.json'}: missing (a partial or altered export)",
        "other-recipe": f"{export}: exported by a different recipe",
    }[problem] in error
    assert not torch.distributed.is_initialized()  # refused before any process group or model
    assert not (run_dir / "stage2").exists()


def test_stage2_refusal_through_python_m_rmpl_ds_train(demo: dict[str, Path], tmp_path: Path) -> None:
    sources = {s: demo["shards"] / s for s in TRAIN_SOURCES}
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "model", sources)
    _export(tmp_path / "run", recipe_dict(tmp_path / "model", sources, lr=1e-4))
    command = [sys.executable, "-m", "rmpl_ds.train", str(recipe), "--stage", "stage2", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert "rmpl_ds.train [rank 0]: error: " in result.stderr and "exported by a different recipe" in result.stderr
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------------------------------------------------- security


def test_nothing_is_unpickled_or_evaluated_from_raw_file_to_loaded_sample(
    demo: dict[str, Path], tmp_path: Path, tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MNRE's dict-literal lines -> `rmpl-ds shards build` -> verify -> open -> SlotDataset -> rendered, encoded
    samples, with every way of unpickling or evaluating made to fail."""
    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.data import Renderer
    from rmpl_ds.loader import SlotDataset, build_stream
    from rmpl_ds.shards import ShardSet, verify_shards

    bundle = get_adapter("qwen2-vl").load_processor(tiny_model_dir("qwen2-vl"))  # the model is not data

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle or evaluate")

    real_eval = builtins.eval

    def eval_of_annotations_only(source: object, *args: object) -> object:
        # records.from_json asks typing.get_type_hints for its dataclasses' field types, which evaluates their
        # annotations: code of rmpl_ds.records, not data. Any other eval fails the test.
        if sys._getframe(1).f_globals.get("__name__") != "typing":
            refuse()
        return real_eval(source, *args)

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(builtins, "eval", eval_of_annotations_only)
    literal_evals = []
    real_literal_eval = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda text: literal_evals.append(1) or real_literal_eval(text))

    out = tmp_path / "mnre"
    raw = demo["raw"] / "mnre"
    argv = ["shards", "build", "--source", "mnre", "--input", str(raw / "mnre_txt"), "--images", str(raw / "img_org")]
    assert cli([*argv, "--out", str(out)]) == 0
    assert literal_evals  # the dict-literal lines really went through ast.literal_eval
    assert verify_shards(out) == []
    shard_set = ShardSet.open(out)
    stream = build_stream([("mnre:r", 1.0)], {"mnre:r": shard_set}, seed=0)
    renderer = Renderer(bundle, tasks=("r",), loss_weights=(1.0,), stream_index={"mnre:r": 0}, max_seq_len=512)
    dataset = SlotDataset(stream, {"mnre:r": shard_set}, transform=renderer)
    for slot in range(len(shard_set)):
        encoded = dataset[slot]
        assert encoded["input_ids"].numel() > 0 and encoded["stream_index"] == 0


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that could run code from a file: pickle loading, eval/exec, torch.load without weights_only=True,
    np.load with allow_pickle=True, yaml.load / unsafe_load."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if (
            name in {"eval", "exec", "pickle.load", "pickle.loads", "pickle.Unpickler", "yaml.load", "yaml.unsafe_load"}
            or (name == "torch.load" and keywords.get("weights_only") != "True")
            or (name in {"np.load", "numpy.load"} and keywords.get("allow_pickle") not in (None, "False"))
        ):
            found.append((node.lineno, name))
    return found


def test_the_package_never_unpickles_or_evaluates() -> None:
    # DeepSpeed's own checkpoint files are pickles it loads itself; we hash-check them first (test_reliability).
    offenders = []
    for path in sorted((ROOT / "rmpl_ds").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in _unsafe_calls(tree)]
    assert not offenders, offenders
    planted = ast.parse(
        "import torch, pickle\ntorch.load(f)\npickle.loads(b)\neval(s)\ntorch.load(f, weights_only=True)"
    )
    assert [name for _, name in _unsafe_calls(planted)] == ["torch.load", "pickle.loads", "eval"]
