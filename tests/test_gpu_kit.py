"""The GPU proof kit (bench/gpu/) keeps working without a GPU.

The slow test runs the kit's one command in its CPU mode, as CI does: the wheel set is checked and installed by the
same pip command (cross-install flags, scratch directory), the GPU cases run as a dry run (full-size model
directories, shards of 2048-token rows, recipes, the planner, each model built on the meta device through the
adapter and held against the planner's parameter counts), and the tiny models go through the real launcher with
random init, LoRA and QLoRA, the result files and the stop-and-resume comparison. The fast tests hold the pieces:
random init in ``BackboneAdapter.load``, the recipe flag, the wheel checks, the time budget, bad input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rmpl_ds.config import recipe_from_dict
from rmpl_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import kit  # noqa: E402  (bench/gpu/kit.py)
import wheels  # noqa: E402  (bench/gpu/wheels.py)


def make_wheel(directory: Path, name: str, version: str, tag: str = "py3-none-any", files: dict | None = None) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding ``files`` (default: one module)."""
    dist_info = f"{name}-{version}.dist-info"
    contents = dict(files or {f"{name}/__init__.py": b"VALUE = 1\n"})
    contents[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    )
    record = []
    for member, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    path = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def wheel_set(tmp_path: Path) -> Path:
    directory = tmp_path / "wheels"
    directory.mkdir()
    make_wheel(directory, "rmpl_fake_a", "1.0")
    make_wheel(directory, "rmpl_fake_b", "2.0")
    wheels.write_manifest(directory, ["rmpl-fake-a", "rmpl-fake-b"], {"rmpl-fake-a": "a note"})
    return directory


# ---------------------------------------------------------------------------------------------------- the kit


@pytest.mark.slow
def test_cpu_mode_of_the_one_command(tmp_path: Path, wheel_set: Path) -> None:
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    began = time.monotonic()
    done = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--cpu-smoke", "--out", str(out), "--wheels", str(wheel_set)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    elapsed = time.monotonic() - began

    install = json.loads((out / "install.json").read_text())
    assert install["dry_run"] and len(install["installed"]) == 2
    assert "--no-index --no-deps" in install["command"] and "--python-version 3.12" in install["command"]

    dry = json.loads((out / "dry-run" / "gpu.json").read_text())
    assert dry["mode"] == "dry-run" and dry["state"] == "done" and dry["install"] == install
    assert [case["name"] for case in dry["cases"]] == [case.name for case in kit.GPU_CASES]
    image_tokens = {"qwen2-vl": 324, "qwen3-vl": 256, "internvl3_5": 256}
    for case in dry["cases"]:
        assert case["status"] == "dry run", case
        assert case["meta_check"]["agree"], case["meta_check"]
        assert case["rows"]["tokens_per_row"] == 2048
        assert case["rows"]["image_tokens_per_row"] == image_tokens[case["family"]]
        predicted = case["predicted"]
        assert predicted["target_tokens"] == case["rows"]["target_tokens_per_row"] > 0
        assert 0 < predicted["allocated_gib"] < predicted["reserved_gib"] < predicted["total_gib"]
        assert predicted["total_gib"] < predicted["total_at_recipe_target_bound_gib"]
    lora_7b = next(case for case in dry["cases"] if case["name"] == "qwen2-vl-7b-lora-2048x2")
    assert lora_7b["predicted"]["params_total"] == 8_291_375_616

    smoke = json.loads((out / "cpu-smoke" / "gpu.json").read_text())
    assert smoke["mode"] == "cpu-smoke" and smoke["state"] == "done"
    assert {case["family"] for case in smoke["cases"]} == {"qwen2-vl", "qwen3-vl", "internvl3_5"}
    assert {case["mode"] for case in smoke["cases"]} == {"lora", "qlora"}
    for case in smoke["cases"]:
        assert case["status"] == "ok", case.get("log_tail", case)
        measured = case["measured"]
        assert len(case["losses"]) == case["steps"] and all(math.isfinite(loss) for loss in case["losses"])
        assert measured["tokens_per_s"] > 0 and measured["samples_per_s"] > 0 and measured["real_token_fraction"] == 1
        assert set(measured["split_s"]) == {"forward_s", "backward_s", "optimizer_s", "other_s"}
        assert measured["split_s"]["backward_s"] > 0
        assert measured["peak_allocated_gib"] > 0 and measured["mfu"]["value"] is None
        assert case["error_pct"]["allocated"] is not None
        assert case["carried_to_2x24"]["predicted_total_gib"] == case["predicted"]["two_gpus_24gib"]["total_gib"]
    resume = smoke["resume"]
    assert resume["status"] == "ok", resume
    assert resume["bitwise_equal"], resume  # CPU: deterministic algorithms, so the resumed losses are exact
    assert len(resume["resumed_losses"]) == resume["steps"] > resume["stop_after"]

    text = (out / "cpu-smoke" / "gpu.md").read_text()
    assert "| tiny-qwen2-vl-qlora-2048x2 | ok |" in text and "Observed tolerance" in text
    assert "| qwen3-vl-8b-lora-2048x1 | dry run |" in (out / "dry-run" / "gpu.md").read_text()
    print(f"CPU mode of bench/gpu/run.sh: {elapsed:.0f} s")


@pytest.mark.slow
def test_gpu_mode_installs_checks_and_refuses_without_cuda(tmp_path: Path, wheel_set: Path) -> None:
    out = tmp_path / "device-out"
    out.mkdir()
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(out),
        RMPL_GPU_SITE=str(tmp_path / "site"),
        RMPL_GPU_WORK=str(tmp_path / "work"),
    )
    done = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--wheels", str(wheel_set), "--budget-s", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "run.sh: transformers" in done.stdout and "CUDA available: False" in done.stdout
    assert "no CUDA device" in done.stderr
    assert (tmp_path / "site" / "rmpl_fake_a" / "__init__.py").is_file()  # installed for real, not a dry run
    logs = (out / "logs.txt").read_text()
    assert "installing" in logs and "CUDA available: False" in logs


def test_a_spent_budget_still_writes_the_results(tmp_path: Path) -> None:
    assert kit.main(["--cpu-smoke", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["state"] == "done"
    assert [case["status"] for case in report["cases"]] == ["not run"] * len(kit.CPU_CASES)
    assert {case["reason"] for case in report["cases"]} == {"time budget"}
    assert report["resume"]["status"] == "not run"
    assert "| tiny-qwen3-vl-lora-2048x1 | not run |" in (tmp_path / "gpu.md").read_text()


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kit.main(["--cpu-smoke"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert kit.main(["--cpu-smoke", "--out", str(tmp_path), "--cases", "nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert kit.main(["--out", str(tmp_path)]) == 2  # the GPU run on a machine without CUDA
    assert "no CUDA device" in capsys.readouterr().err
    assert kit.main(["--dry-run", "--out", str(tmp_path), "--install-json", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
    done = subprocess.run(["bash", "bench/gpu/run.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr


def test_a_case_that_raises_becomes_a_failed_result() -> None:
    def broken(ctx: object, case: kit.Case) -> dict:
        raise RuntimeError("the model did not build\nsecond line")

    result = kit.guarded(broken, None, kit.CPU_CASES[0])
    assert result == {
        "name": kit.CPU_CASES[0].name,
        "status": "failed",
        "error": "RuntimeError: the model did not build",
    }


def test_step_split_from_deepspeed_timers(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text(
        "[Rank 0] time (ms) | fwd_microstep: 1.00 | bwd_microstep: 2.00 | step_microstep: 3.00\n"
        "[Rank 0] time (ms) | fwd: 120.50 | bwd: 300.25 | bwd_inner: 290.00 | bwd_allreduce: 10.25 | step: 4.00\n"
        "train:  50%|#####| [Rank 0] time (ms) | fwd: 100.00 | bwd: 200.00 | bwd_inner: 1.00 | step: 2.00\n"
    )
    assert kit.step_splits(log) == [
        {"forward_s": 0.1205, "backward_s": 0.30025, "optimizer_s": 0.004},
        {"forward_s": 0.1, "backward_s": 0.2, "optimizer_s": 0.002},
    ]


@pytest.mark.slow
def test_a_run_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    outcome = kit.launch(
        tmp_path / "recipe.yaml", tmp_path / "run", stop_after=1, resume="none", timeout_s=1.0, log=tmp_path / "r.log"
    )
    assert outcome.timed_out and outcome.exit_code != 0
    assert outcome.wall_s < 25
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "recipe.yaml") not in ps  # neither the launcher nor anything it started is left


# ---------------------------------------------------------------------------------------------------- random init


def test_full_size_model_directory_has_the_published_shapes_and_tiny_tokenizer_ids(tmp_path: Path) -> None:
    from rmpl_ds.backbones import get_adapter

    model_dir = kit.write_model_dir("qwen2-vl", tmp_path / "qwen2-vl", full_size=True)
    adapter = get_adapter("qwen2-vl")
    bundle = adapter.load_processor(model_dir)
    published = adapter.spec.full_size_config_dict()
    assert bundle.config.get_text_config().hidden_size == published["hidden_size"] == 3584
    assert bundle.config.get_text_config().vocab_size == published["vocab_size"] == 152_064
    assert bundle.config.image_token_id == bundle.special.image < 5000  # the tiny tokenizer's id, checked at load
    assert bundle.image_token_count(512, 512) == 324  # the published preprocessor: 512 -> 504 px, 36 x 36 / 4
    assert not list(model_dir.glob("*.safetensors"))


def test_random_init_builds_the_same_model_for_the_same_seed_and_quantizes_it(tiny_model_dir) -> None:
    import bitsandbytes as bnb
    import torch

    from rmpl_ds.backbones import get_adapter
    from rmpl_ds.config import LoraConfig

    adapter = get_adapter("qwen2-vl")
    path = tiny_model_dir("qwen2-vl")
    settings = LoraConfig(rank=4, alpha=8)

    def weights(mode: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
        torch.manual_seed(seed)
        model, _ = adapter.load(path, mode, lora=settings, device="cpu", random_init=True)
        return {name: tensor.clone() for name, tensor in model.get_base_model().state_dict().items()}, model

    first, _ = weights("lora", 0)
    again, _ = weights("lora", 0)
    other, _ = weights("lora", 1)
    name = next(name for name in first if name.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    assert all(torch.equal(first[key], again[key]) for key in first)  # a resumed run rebuilds the same frozen base
    assert not torch.equal(first[name], other[name])
    pretrained, _ = adapter.load(path, "lora", lora=settings, device="cpu")
    # build_tiny initialized the checkpoint the same way under seed 0; under seed 1 it was not read
    assert torch.equal(first[name], pretrained.get_base_model().state_dict()[name])
    assert not torch.equal(other[name], pretrained.get_base_model().state_dict()[name])

    _, quantized = weights("qlora", 0)
    assert quantized.get_base_model().is_loaded_in_4bit
    four_bit = [module for module in quantized.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # the seven projections of both tiny layers; the vision tower stays bf16
    assert sum(p.numel() for p in quantized.parameters() if p.requires_grad) > 0


def test_recipe_init_flag_is_validated() -> None:
    recipe = {
        "name": "r",
        "model": {"family": "qwen2-vl", "path": "m", "init": "random"},
        "sources": {"a": "s"},
        "stages": [
            {"name": "one", "mixture": [{"source": "a", "task": "t", "weight": 1}], "steps": 1, "lr": 1e-4},
            {
                "name": "two",
                "init_from": "one",
                "mixture": [{"source": "a", "task": "EM", "weight": 1}],
                "steps": 1,
                "lr": 1e-4,
            },
        ],
    }
    with pytest.raises(ConfigError) as error:
        recipe_from_dict(recipe, world_size=1)
    assert "stages[1].init_from: model.init is random" in str(error.value)
    recipe["stages"] = recipe["stages"][:1]
    assert recipe_from_dict(recipe, world_size=1).model.init == "random"
    recipe["model"]["init"] = "zeros"
    with pytest.raises(ConfigError, match=r"model\.init: must be one of pretrained, random"):
        recipe_from_dict(recipe, world_size=1)


# ---------------------------------------------------------------------------------------------------- wheels


def test_wheel_set_checks_name_each_problem(tmp_path: Path, wheel_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert wheels.check(wheel_set, python="3.12") == []
    manifest = json.loads((wheel_set / "manifest.json").read_text())
    assert manifest["required"] == ["rmpl-fake-a", "rmpl-fake-b"]
    assert [wheel["note"] for wheel in manifest["wheels"] if "note" in wheel] == ["a note"]

    (wheel_set / "rmpl_fake_a-1.0-py3-none-any.whl").write_bytes(b"changed")
    make_wheel(wheel_set, "rmpl_fake_b", "3.0")
    make_wheel(wheel_set, "rmpl_fake_c", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = "\n".join(wheels.check(wheel_set, python="3.12"))
    assert "rmpl_fake_a-1.0-py3-none-any.whl: differs from the manifest" in problems
    assert "rmpl_fake_b-3.0-py3-none-any.whl: not in the manifest" in problems
    assert "rmpl_fake_c-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: not in the manifest" in problems

    with pytest.raises(wheels.WheelSetError) as error:
        wheels.write_manifest(wheel_set, ["rmpl-fake-d"], {})
    text = str(error.value)
    assert "rmpl-fake-b: more than one version" in text
    assert (
        "rmpl_fake_c-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: tags cp311-cp311-manylinux_2_17_x86_64 do not" in text
    )
    assert "required rmpl-fake-d has no wheel" in text

    monkeypatch.setattr(wheels, "CARRY_LIMIT_BYTES", 100)
    assert any("over the device tool's" in problem for problem in wheels.check(wheel_set, python="3.12"))


def test_wheel_cli_exits_2_naming_the_missing_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert wheels.main(["check", str(tmp_path)]) == 2
    assert f"{tmp_path / 'manifest.json'}: no wheel manifest" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{not json")
    assert wheels.main(["install", str(tmp_path), "--site", str(tmp_path / "site"), "--dry-run"]) == 2
    assert "unreadable manifest" in capsys.readouterr().err


def test_install_uses_the_manifest_and_installs_every_wheel(tmp_path: Path, wheel_set: Path) -> None:
    done = wheels.install(wheel_set, tmp_path / "site", dry_run=False)
    assert done["installed"] == ["rmpl_fake_a-1.0.dist-info", "rmpl_fake_b-2.0.dist-info"]
    assert (tmp_path / "site" / "rmpl_fake_a" / "__init__.py").read_text() == "VALUE = 1\n"
    command = wheels.install_command(wheel_set, tmp_path / "site", dry_run=True)
    assert command[command.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in command


def test_slimmed_bitsandbytes_wheel_keeps_the_named_libraries_and_a_valid_record(tmp_path: Path) -> None:
    libraries = {
        f"bitsandbytes/libbitsandbytes_{name}.so": name.encode() * 100 for name in ("cuda118", "cuda130", "cpu")
    }
    path = make_wheel(tmp_path, "bitsandbytes", "0.50.2", files={"bitsandbytes/__init__.py": b"", **libraries})
    result = wheels.slim_wheel(path, ["cuda130", "cpu"])
    assert result["dropped"] == ["libbitsandbytes_cuda118.so"] and result["bytes_after"] < result["bytes_before"]
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        for line in record:
            member, digest, size = line.rsplit(",", 2)
            assert member in names
            if digest:
                data = archive.read(member)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={expected}" and int(size) == len(data)
    assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names
    assert {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"} <= names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), str(path)],
        check=True,
    )
    assert (site / "bitsandbytes" / "libbitsandbytes_cpu.so").read_bytes() == b"cpu" * 100
    with pytest.raises(wheels.WheelSetError, match=r"has no libbitsandbytes_cuda999\.so"):
        wheels.slim_wheel(path, ["cuda999"])
