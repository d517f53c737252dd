"""A shortened demo pipeline end to end: demo data in the real formats -> shards -> Stage I -> Stage II (real launcher,
2 CPU ranks) -> evaluation of the base, Stage I and Stage II models -> report; then a second run reuses everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_shortened_demo_pipeline(tmp_path: Path, tiny_model_dir) -> None:
    from rmpl_ds.sources.demo import write_demo

    raw = tmp_path / "raw"
    write_demo(raw, seed=0, size=30)
    recipe = {
        "extends": str(ROOT / "launch" / "recipes" / "demo.yaml"),
        "name": "demo-short",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_model_dir("qwen2-vl"))},
        "sources": {name: str(tmp_path / "shards" / name) for name in ("ace", "swig", "mnre", "m2e2")},
        "raw": {
            "ace": {"converter": "ace", "input": str(raw / "ace")},
            "swig": {
                "converter": "swig",
                "input": str(raw / "swig" / "SWiG_jsons"),
                "images": str(raw / "swig" / "images_512"),
            },
            "mnre": {
                "converter": "mnre",
                "input": str(raw / "mnre" / "mnre_txt"),
                "images": str(raw / "mnre" / "img_org"),
            },
            "m2e2": {
                "converter": "m2e2",
                "input": str(raw / "m2e2" / "m2e2_annotations"),
                "images": str(raw / "m2e2" / "image"),
            },
        },
        "launch": {"deepspeed_config": "zero2", "num_workers": 0},
        "evaluation": {
            "m2e2": str(raw / "m2e2" / "m2e2_annotations"),
            "images": str(raw / "m2e2" / "image"),
            "limit": 4,
            "max_new_tokens": 16,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    shorten = [
        f"stages.{stage}.{key}={value}"
        for stage in ("stage1", "stage2")
        for key, value in (
            ("steps", 2),
            ("warmup_steps", 1),
            ("global_batch", 4),
            ("micro_batch", 2),
            ("checkpoint_every", 2),
        )
    ]
    command = [sys.executable, "-m", "rmpl_ds", "pipeline", str(path), *shorten]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "report:" in first.stdout and "tensorboard --logdir" in first.stdout

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == {"stage1", "stage2"}
    for name, stage in summary["stages"].items():
        assert stage["steps"] == 2 and stage["final_loss"] > 0 and Path(stage["export"]).is_dir(), name
        assert Path(stage["checkpoints"]).is_dir() and stage["wall_time_s"] > 0
    assert set(summary["eval"]) == {"baseline", "stage1", "stage2"}
    for scores in summary["eval"].values():
        assert set(scores) >= {"event_mention", "argument_role", "union"}
        assert set(scores["event_mention"]) == {"text_only", "image_only", "multimedia"}
        assert set(scores["event_mention"]["text_only"]) >= {"p", "r", "f1", "macro_f1", "tp", "pred", "gold"}
    assert set(summary["learning_margin_em_f1"]) == {"text_only", "image_only"}
    report = (run / "report.md").read_text()
    assert "Table 2" in report and "| stage2 |" in report and "curves_stage1.png" in report
    assert (
        "### stage2: held-out evaluation during training" in report
        and "| step | held-out loss | AR F1 | EM F1 |" in report
    )
    for png in ("f1.png", "curves_stage1.png", "curves_stage2.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (run / "tensorboard" / "stage1").is_dir() and (run / "tensorboard" / "eval").is_dir()

    # Resumable at stage granularity: nothing is trained or evaluated again.
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "stage stage1: finished earlier" in second.stderr and "stage stage2: finished earlier" in second.stderr
    for name in ("baseline", "stage1", "stage2"):
        assert f"eval {name}: reusing" in second.stderr, name
    assert "launch.py" not in second.stdout + second.stderr  # no deepspeed launcher was started
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]
