"""README "Your first real run", run as written: the demo data laid out as the README says, the tiny Qwen2-VL where
the README's `hf download` puts the weights, and the README's own commands (shards, check --deep, pipeline) from
the project root. Only the pipeline gets overrides that make it a 2-step run on 2 CPU ranks."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    *(
        f"stages.{stage}.{key}={value}"
        for stage in ("stage1", "stage2")
        for key, value in (("steps", 2), ("warmup_steps", 0), ("checkpoint_every", 2))
    ),
    "stages.stage2.eval.max_items=2",
    "stages.stage2.eval.max_new_tokens=8",
    "evaluation.limit=2",
    "evaluation.max_new_tokens=8",
    "launch.num_workers=0",
]


def readme_commands() -> list[list[str]]:
    """The `rmpl-ds` lines of the code block in the README's "Your first real run" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your first real run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "the section has no bash block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.startswith("rmpl-ds ")]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, demo_shards: dict[str, Path], tiny_model_dir: Callable) -> Path:
    """A project root: launch/recipes as shipped, data/ in the README's layout (the demo's raw files), the weights
    where `hf download ... --local-dir models/Qwen2-VL-7B-Instruct` puts them."""
    root = tmp_path_factory.mktemp("first-run")
    raw = demo_shards["ace"].parents[1] / "raw"
    shutil.copytree(ROOT / "launch" / "recipes", root / "launch" / "recipes")
    layout = {
        "data/ace05": raw / "ace",
        "data/swig/SWiG_jsons": raw / "swig" / "SWiG_jsons",
        "data/swig/images_512": raw / "swig" / "images_512",
        "data/mnre/mnre_txt": raw / "mnre" / "mnre_txt",
        "data/mnre/img_org": raw / "mnre" / "img_org",
        "data/m2e2/m2e2_annotations": raw / "m2e2" / "m2e2_annotations",
        "data/m2e2/image/image": raw / "m2e2" / "image",
    }
    for name, source in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(source, target_is_directory=True)
    shutil.copytree(tiny_model_dir("qwen2-vl"), root / "models" / "Qwen2-VL-7B-Instruct")
    return root


def test_the_readme_first_run_commands_work_on_the_demo_data(project: Path) -> None:
    commands = readme_commands()
    assert [c[1] for c in commands] == ["shards", "shards", "shards", "check", "pipeline"], commands
    for command in commands:
        extra = QUICK if command[1] in ("check", "pipeline") else []
        done = subprocess.run(
            [sys.executable, "-m", "rmpl_ds", *command[1:], *extra],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    run = project / "runs" / "rmpl-qwen2vl-7b"
    assert (run / "report.md").is_file() and (run / "summary.json").is_file()
    assert (run / "tensorboard" / "stage1").is_dir() and (run / "tensorboard" / "eval").is_dir()
    assert (run / "stage2" / "export" / "rmpl_export.json").is_file()
    assert (run / "stage1" / "train.log").is_file()
