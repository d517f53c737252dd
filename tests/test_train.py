"""The stage runner under the real deepspeed launcher: 2 gloo ranks on the CPU, a tiny Qwen2-VL, demo shards.

One uninterrupted reference run of Stage I, then runs that are stopped (SIGTERM; kill -9 of one rank) and resumed
must log exactly the same losses (bitwise: CPU, deterministic algorithms). Stage I weights its streams by dynamic
weight averaging (windows of 2 steps: the weights move from step 5 on), so the resumed runs also prove that the DWA
state goes through the checkpoint. Stage II must start from exactly Stage
I's exported weights. QLoRA runs the same loop. Each launcher run takes ~30-60 s here, hence `slow`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rmpl_ds.checkpoint import CheckpointRef, complete_checkpoints
from rmpl_ds.commands.train import rank_processes
from rmpl_ds.evaluate.curves import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
DWA_WINDOW = 2
STREAMS = ("ace:t", "swig:i", "mnre:r")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, launcher_recipe) -> dict:
    base = tmp_path_factory.mktemp("train")
    stage2 = {
        "name": "stage2",
        "init_from": "stage1",
        "mixture": [{"source": "ace", "task": "EM", "weight": 1}, {"source": "swig", "task": "AR", "weight": 1}],
        "steps": 2,
    }
    recipe = launcher_recipe(base, "train-test", steps=STEPS, keep_last=2, later_stages=(stage2,))
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["loss_weighting"] = {"kind": "dwa", "temperature": 0.5, "window": DWA_WINDOW}
    recipe.write_text(yaml.safe_dump(raw))
    return {"base": base, "recipe": recipe}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Launched:
    """One `rmpl-ds train` run and the file that holds its output."""

    process: subprocess.Popen
    log: Path


def train(setup: dict, out: Path, stage: str = "stage1", *extra: str, wait: bool = True) -> Launched:
    command = [
        sys.executable,
        "-m",
        "rmpl_ds",
        "train",
        str(setup["recipe"]),
        "--stage",
        stage,
        "--out",
        str(out),
        "--master-port",
        str(free_port()),
        *extra,
    ]
    log = out.parent / f"{out.name}-{stage}-{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
    launched = Launched(process, log)
    if wait:
        code = process.wait(timeout=600)
        assert code == 0, log.read_text()[-4000:]
    return launched


def losses(out: Path, stage: str = "stage1") -> list[float]:
    return [m["loss"] for m in read_metrics(out / stage / "metrics.jsonl")]


def metric_lines(out: Path, stage: str = "stage1") -> list[dict]:
    """Every line of metrics.jsonl in order: a resumed run appends after the lines of the run it continues."""
    path = out / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def resume_trace(out: Path, stage: str = "stage1") -> list[dict]:
    """The lines of resume.jsonl: one per resume, where the run continued from (rmpl_ds.train.resume)."""
    path = out / stage / "resume.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class Stopped:
    """What a stopped run left for `--resume auto`: its newest sealed checkpoint, the sha256 of rank 0's torch RNG
    state saved in it, and how many lines metrics.jsonl holds."""

    checkpoint: CheckpointRef
    rng: str
    lines: int

    @classmethod
    def of(cls, out: Path) -> Stopped:
        import torch

        start = complete_checkpoints(out / "stage1" / "checkpoints")[-1]
        # Our own checkpoint, just written by the run under test: DeepSpeed's files need full unpickling.
        states = torch.load(start.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        rng = hashlib.sha256(states["rmpl"]["rng"][0]["torch"].numpy().tobytes()).hexdigest()
        return cls(start, rng, len(metric_lines(out)))


def assert_resumed_exactly(out: Path, reference: Path, resumed: Launched, stopped: Stopped) -> None:
    """The run `resumed` continued from the stopped run's newest checkpoint, not from step 0: the resume trace and
    the log name that checkpoint, rank 0's RNG is the one it saved, the sampler continues at its slot with its
    draws (origin 0), the first step it logged is the next one; and every step it logged has the loss of the
    uninterrupted run, bit for bit."""
    start = stopped.checkpoint
    (trace,) = resume_trace(out)
    assert (trace["checkpoint"], trace["step"]) == (str(start.path), start.step)
    assert trace["next_slot"] == start.step * 4 and trace["sampler_origin"] == 0  # global batch 4
    assert trace["torch_rng_sha256"] == stopped.rng
    assert f"resumed from {start.path}: step {start.step}, next slot {start.step * 4}" in resumed.log.read_text()
    lines = metric_lines(out)[stopped.lines :]
    assert [m["step"] for m in lines] == list(range(start.step + 1, STEPS + 1))
    uninterrupted = {m["step"]: m for m in metric_lines(reference)}
    assert [m["loss"] for m in lines] == [uninterrupted[m["step"]]["loss"] for m in lines]
    assert [m["loss_weights"] for m in lines] == [uninterrupted[m["step"]]["loss_weights"] for m in lines]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (exit code {process.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(setup: dict) -> Path:
    """The uninterrupted Stage I run every resumed run is compared with."""
    out = setup["base"] / "reference"
    train(setup, out)
    return out


def test_stage_run_logs_checkpoints_and_exports(reference: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = read_metrics(reference / "stage1" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    first = metrics[0]
    assert set(first["loss_by_stream"]) <= {"ace:t", "swig:i", "mnre:r"}
    assert sum(first["stream_counts"].values()) == 4  # the global batch
    for key in (
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "real_token_fraction",
        "peak_memory_gib",
        "step_time_s",
        "epochs",
    ):
        assert key in first, key
    # DWA: weights 1 until two windows closed (steps 1-2, 3-4), then K softmax(0.5 x ratio of the window means),
    # recomputed here from the logged per-stream losses and counts
    from rmpl_ds.weighting import dwa_weights

    def window_means(steps: range) -> list[float]:
        sums = [
            sum(metrics[s - 1]["loss_by_stream"].get(n, 0.0) * metrics[s - 1]["stream_counts"][n] for s in steps)
            for n in STREAMS
        ]
        counts = [sum(metrics[s - 1]["stream_counts"][n] for s in steps) for n in STREAMS]
        return [total / count for total, count in zip(sums, counts, strict=True)]

    assert all(m["loss_weights"] == dict.fromkeys(STREAMS, 1.0) for m in metrics[:4])
    for step in (5, 7):  # the weights set by the windows closed at steps 4 and 6, for the next two steps
        before = dwa_weights(window_means(range(step - 2, step)), window_means(range(step - 4, step - 2)), 0.5)
        for s in (step, step + 1):
            assert [metrics[s - 1]["loss_weights"][n] for n in STREAMS] == pytest.approx(before, rel=1e-12)
    assert metrics[4]["loss_weights"] != metrics[6]["loss_weights"]
    for m in metrics:  # the weights enter the loss: the step's loss is the weighted mean of the per-sample losses
        weighted = sum(
            m["loss_weights"][n] * m["loss_by_stream"][n] * m["stream_counts"][n] for n in m["loss_by_stream"]
        )
        assert m["loss"] == pytest.approx(weighted / sum(m["stream_counts"].values()), rel=1e-5)
    assert all(sum(m["loss_weights"].values()) == pytest.approx(3.0) for m in metrics)
    # Over all steps the realized mixture is exactly 1:1:1 (32 slots -> 11/11/10).
    totals = {name: sum(m["stream_counts"][name] for m in metrics) for name in ("ace:t", "swig:i", "mnre:r")}
    assert sorted(totals.values()) == [10, 11, 11]

    events = EventAccumulator(str(reference / "tensorboard" / "stage1"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "throughput/samples_per_s",
        "throughput/tokens_per_s",
        "data/real_token_fraction",
        "memory/peak_rss_gib",
        "train/loss_by_stream/ace:t",
        "train/loss_by_stream/swig:i",
        "train/loss_by_stream/mnre:r",
        "train/loss_weight/ace:t",
        "data/realized_share/ace:t",
        "data/epochs/mnre:r",
    ):
        assert tag in tags, tag
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert events.Scalars("train/loss")[-1].value == pytest.approx(metrics[-1]["loss"])
    # the realized share is exact: 32 slots of 1:1:1 -> 11/11/10
    assert sorted(round(metrics[-1]["realized_share"][name] * 32) for name in ("ace:t", "swig:i", "mnre:r")) == [
        10,
        11,
        11,
    ]

    # keep_last 2 of the sealed checkpoints; each holds every rank's ZeRO-2 optimizer shard, and LoRA runs save
    # only the trainable parameters.
    refs = complete_checkpoints(reference / "stage1" / "checkpoints")
    assert [ref.step for ref in refs] == [STEPS - 2, STEPS]
    files = {p.name for p in refs[-1].path.iterdir()}
    assert {
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "rmpl_complete.json",
    } <= files
    model_states = refs[-1].path / "mp_rank_00_model_states.pt"
    base_weights = sum(p.stat().st_size for p in (reference / "stage1" / "export").glob("*.safetensors"))
    assert model_states.stat().st_size < base_weights / 2
    manifest = json.loads((reference / "stage1" / "export" / "rmpl_export.json").read_text())
    assert manifest["kind"] == "merged" and manifest["step"] == STEPS


def test_stage2_starts_from_exactly_stage1s_weights(setup: dict, reference: Path) -> None:
    train(setup, reference, "stage2")
    summary = json.loads((reference / "stage2" / "summary.json").read_text())
    exported = json.loads((reference / "stage1" / "export" / "rmpl_export.json").read_text())
    assert summary["init_from"] == "stage1"
    assert summary["init_digest"] == exported["weights_digest"]
    # A Stage II that would start from a changed Stage I export is refused before training, as bad input, for
    # that reason.
    export = reference / "stage1" / "export"
    (export / "config.json").write_text((export / "config.json").read_text() + " ")
    lines_before = len(metric_lines(reference, "stage2"))
    refused = train(setup, reference, "stage2", "--resume", "none", wait=False)
    refused.process.wait(timeout=600)
    output = refused.log.read_text()
    assert refused.process.returncode == 2, output[-4000:]
    assert f"{export / 'config.json'}: modified (a partial or altered export); re-run stage 'stage1'" in output
    assert "Traceback" not in output and len(metric_lines(reference, "stage2")) == lines_before


def test_exact_resume_after_sigterm(setup: dict, reference: Path) -> None:
    out = setup["base"] / "sigterm"
    first = train(setup, out, wait=False)
    wait_for(lambda: len(metric_lines(out)) >= 1, first.process)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=120) == 0  # the step finished, a checkpoint was written, every rank exited 0
    stopped = Stopped.of(out)
    assert stopped.checkpoint.step < STEPS
    assert [m["step"] for m in metric_lines(out)] == list(range(1, stopped.checkpoint.step + 1))
    assert not resume_trace(out)
    resumed = train(setup, out)  # --resume auto
    assert_resumed_exactly(out, reference, resumed, stopped)
    assert losses(out) == losses(reference)


def test_exact_resume_after_kill_9_of_one_rank(setup: dict, reference: Path) -> None:
    out = setup["base"] / "kill9"
    first = train(setup, out, wait=False)
    root = out / "stage1" / "checkpoints"
    wait_for(lambda: any(ref.step >= 4 for ref in complete_checkpoints(root)), first.process)
    victim = next(p for p in rank_processes(first.process.pid) if "--local_rank=1" in p.cmdline())
    killed_at = time.monotonic()
    victim.kill()
    code = first.process.wait(timeout=120)
    assert code != 0
    assert time.monotonic() - killed_at < 60  # the launcher notices and stops the other rank promptly
    stopped = Stopped.of(out)
    resumed = train(setup, out)  # --resume auto: the newest complete checkpoint
    assert_resumed_exactly(out, reference, resumed, stopped)
    assert losses(out) == losses(reference)


def test_qlora_stage_trains_under_zero2(setup: dict) -> None:
    out = setup["base"] / "qlora"
    train(setup, out, "stage1", "model.mode=qlora", "stages.stage1.steps=2", "stages.stage1.checkpoint_every=2")
    metrics = read_metrics(out / "stage1" / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    manifest = json.loads((out / "stage1" / "export" / "rmpl_export.json").read_text())
    assert manifest["kind"] == "merged"  # dequantized, merged, saved in bf16
