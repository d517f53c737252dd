"""`rmpl-ds smoke`: the command line over the tiny variants (the full grid of families and modes runs in
test_backbones_train.py; here one mode per family, through the CLI)."""

from __future__ import annotations

import json

import pytest

from rmpl_ds import cli
from rmpl_ds.commands.smoke import smoke_examples
from rmpl_ds.tasks import TASKS


def test_smoke_examples_cover_every_task_with_images() -> None:
    examples = smoke_examples()
    assert [example.task for example in examples] == ["t", "i", "r", "EM", "AR", "joint", "vs", "ts"]
    assert {example.task for example in examples} == set(TASKS)
    assert [len(example.images) for example in examples] == [0, 1, 1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize(
    ("backbone", "mode"),
    [("qwen2-vl", "qlora"), ("qwen3-vl", "full"), ("internvl3_5", "lora"), ("qwen2.5-vl", "qlora")],
)
def test_smoke_json(backbone: str, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["smoke", "--backbone", backbone, "--mode", mode, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {
        "loss",
        "loss_full_logits",
        "max_grad_rel_diff",
        "trainable_params",
        "total_params",
        "label_fraction",
    }
    assert 5.0 < result["loss"] < 12.0
    # the lean path (target-only LM head) equals the full one up to bf16 rounding: the weights are bf16 (one ulp is
    # 2^-8 = 0.4 % relative; Qwen3-VL's full fine-tuning of the 8-example batch differs by 0.45 %, 1.2 ulp, in the
    # embedding gradient); tests/test_loss.py holds the two paths equal in fp32
    assert result["loss_full_logits"] == pytest.approx(result["loss"], rel=1e-5)
    assert 0.0 <= result["max_grad_rel_diff"] < 1e-2
    assert 0 < result["trainable_params"] < result["total_params"]
    assert 0.0 < result["label_fraction"] < 0.5


def test_smoke_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["smoke", "--backbone", "qwen2-vl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qwen2-vl lora: loss ") and "trainable" in out and "label tokens" in out
    assert "full logits" in out and "largest relative gradient difference" in out


def test_smoke_refuses_an_unknown_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["smoke", "--backbone", "llava"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'llava'" in capsys.readouterr().err
