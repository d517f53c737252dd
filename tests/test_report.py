"""M2E2 reports: Table 2 markdown, the F1 chart, TensorBoard scalars read back, and `rmpl-ds score --report-dir`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from rmpl_ds.cli import main
from rmpl_ds.evaluate.m2e2 import Predictions, gold_as_predictions, score_m2e2, write_predictions
from rmpl_ds.evaluate.report import (
    log_scores_to_tensorboard,
    render_markdown,
    tensorboard_scalars,
    write_report,
)
from rmpl_ds.sources.m2e2 import M2E2Gold, load_m2e2


@pytest.fixture(scope="session")
def m2e2_sample(real_fixtures: Path) -> Path:
    return real_fixtures / "m2e2"


@pytest.fixture(scope="module")
def sample(m2e2_sample: Path) -> M2E2Gold:
    return load_m2e2(m2e2_sample, strict=True)


@pytest.fixture(scope="module")
def results(sample: M2E2Gold) -> dict[str, dict[str, Any]]:
    gold = gold_as_predictions(sample)
    half = Predictions(text=gold.text[::2], image=gold.image[1::2], multimedia=gold.multimedia[:5])
    return {
        "oracle": score_m2e2(sample, gold).to_json(),
        "half": score_m2e2(sample, half).to_json(),
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_table_2_has_one_row_per_model_in_order(results: dict[str, dict[str, Any]]) -> None:
    text = render_markdown(results, extra_md="Run by the test.")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = table[0].split(" | ")
    assert header[1:4] == ["T EM P", "T EM R", "T EM F1"]
    assert len(header) == 1 + 3 * 2 * 3  # model + 3 settings x (EM, AR) x (P, R, F1)
    rows = [line for line in table if line.startswith(("| oracle |", "| half |"))]
    assert [row.split(" | ")[0] for row in rows[:2]] == ["| oracle", "| half"]
    oracle, half = (row.strip("| ").split(" | ") for row in rows[:2])
    assert oracle[1:] == ["100.0"] * 18
    em = results["half"]["event_mention"]["text_only"]
    ar = results["half"]["argument_role"]["multimedia"]
    assert half[1:4] == [f"{em['p']:.1f}", f"{em['r']:.1f}", f"{em['f1']:.1f}"]
    assert half[-3:] == [f"{ar['p']:.1f}", f"{ar['r']:.1f}", f"{ar['f1']:.1f}"]
    # Raw counts and the gold sizes are there, so every number can be recomputed.
    assert "| half | 10 / 10 / 19 |" in text
    assert "30 text events (21 text-only + 9 multimedia), 22 image events" in text
    assert text.rstrip().endswith("Run by the test.")


def test_write_report_writes_markdown_chart_and_scores(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    paths = write_report(tmp_path / "report", results)
    assert paths.markdown.read_text().startswith("# M2E2 evaluation")
    width, height = png_size(paths.chart)
    assert width > 800 and height > 300
    assert json.loads(paths.scores.read_text()) == results
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["f1.png", "report.md", "scores.json"]


def test_a_bad_score_object_is_named(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    broken = json.loads(json.dumps(results["half"]))
    del broken["argument_role"]["image_only"]["f1"]
    with pytest.raises(ValueError, match=r"scores of 'b': argument_role.image_only lacks f1"):
        write_report(tmp_path, {"a": results["oracle"], "b": broken})
    assert not (tmp_path / "report.md").exists()
    with pytest.raises(ValueError, match="no results"):
        render_markdown({})


def test_tensorboard_scalars_read_back(results: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = log_scores_to_tensorboard(tmp_path / "tb", results["half"], step=7, prefix="eval/m2e2")
    expected = dict(tensorboard_scalars(results["half"], "eval/m2e2"))
    assert written == len(expected) == (2 * 3 + 2 * 2) * 4
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert sorted(tags) == sorted(expected)
    events = accumulator.Scalars("eval/m2e2/event_mention/text_only/f1")
    assert [event.step for event in events] == [7]
    assert events[0].value == pytest.approx(results["half"]["event_mention"]["text_only"]["f1"], rel=1e-6)
    union = accumulator.Scalars("eval/m2e2/union/argument_role/image/r")[0].value
    assert union == pytest.approx(results["half"]["union"]["argument_role"]["image"]["r"], rel=1e-6)


def test_tensorboard_accepts_a_writer(results: dict[str, dict[str, Any]]) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []
            self.flushed = False

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.calls.append((tag, value, step))

        def flush(self) -> None:
            self.flushed = True

    recorder = Recorder()
    log_scores_to_tensorboard(recorder, results["oracle"], step=3, prefix="stage2")
    assert recorder.flushed
    assert ("stage2/argument_role/multimedia/macro_f1", 100.0, 3) in recorder.calls
    assert all(tag.startswith("stage2/") for tag, _, _ in recorder.calls)


def test_score_command_writes_a_side_by_side_report(
    m2e2_sample: Path, sample: M2E2Gold, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gold = gold_as_predictions(sample)
    oracle = write_predictions(tmp_path / "oracle.jsonl", gold)
    partial = write_predictions(tmp_path / "partial.jsonl", Predictions(text=gold.text[:3]))
    out = tmp_path / "out"
    code = main(
        [
            "score", "--gold", str(m2e2_sample), "--pred", str(oracle), "--pred", f"few={partial}",
            "--report-dir", str(out), "--json",
        ]
    )  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["oracle", "few"]
    assert printed["oracle"]["event_mention"]["multimedia"]["f1"] == 100.0
    assert json.loads((out / "scores.json").read_text()) == printed
    report = (out / "report.md").read_text()
    assert "| oracle | 100.0 |" in report and "| few | " in report
    assert f"- few: `{partial}`" in report
    png_size(out / "f1.png")
