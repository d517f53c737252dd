"""Faults a stage must survive, on 2 gloo CPU ranks under the real deepspeed launcher with a tiny Qwen2-VL.

Each fault is real where it can be (SIGSTOP of a rank, SIGINT to `rmpl-ds train`, a byte changed in a checkpoint)
and injected through rmpl_ds.engine.Faults where its timing cannot be hit from outside (NaN losses at given steps,
SIGKILL between writing a checkpoint and sealing it, RLIMIT_FSIZE before a checkpoint): the detection and recovery
paths are the real ones. Launcher runs take 30-70 s each here, hence `slow` (CI runs them); the signal handling of
a single process and RELIABILITY.md's consistency with this suite are fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from rmpl_ds import checkpoint
from rmpl_ds.engine import DEFAULT_COLLECTIVE_TIMEOUT_S, Faults, collective_timeout_s
from rmpl_ds.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# Steps whose loss becomes NaN on rank 1 only (rank 0's stay finite: the ranks must agree to skip).
NAN_STEPS = (3, 4, 5, 7, 8, 9, 10)
MAX_BAD_STEPS = 4
HUNG_RANK_TIMEOUT_S = 20
# deepspeed's launcher gives a rank it stops 30 s before SIGKILL (a stopped rank cannot act on SIGTERM).
LAUNCHER_GRACE_S = 30


# ------------------------------------------------------------------------------------------------ fast: units


def test_collective_timeout_comes_from_the_flag_the_environment_or_the_default() -> None:
    assert collective_timeout_s(None, {}) == DEFAULT_COLLECTIVE_TIMEOUT_S == 1800
    assert collective_timeout_s(None, {"RMPL_COLLECTIVE_TIMEOUT_S": "90"}) == 90
    assert collective_timeout_s(12.5, {"RMPL_COLLECTIVE_TIMEOUT_S": "90"}) == 12.5
    with pytest.raises(UserError, match="--collective-timeout: must be a positive number of seconds, got 0"):
        collective_timeout_s(0, {})
    with pytest.raises(UserError, match="RMPL_COLLECTIVE_TIMEOUT_S: expected a number of seconds, got 'soon'"):
        collective_timeout_s(None, {"RMPL_COLLECTIVE_TIMEOUT_S": "soon"})


def test_fault_injection_is_off_unless_asked_for() -> None:
    assert Faults.from_env({}) == Faults()
    assert not Faults.from_env({}).nan_at(3)
    faults = Faults.from_env({"RMPL_FAULT_NAN_STEPS": "3, 4", "RMPL_FAULT_RANK": "1"})
    assert faults.nan_steps == {3, 4} and faults.rank == 1
    assert not faults.nan_at(3)  # this process is rank 0
    assert Faults.from_env({"RMPL_FAULT_NAN_STEPS": "3,4"}).nan_at(4)


# ------------------------------------------------------------------------------- fast: signals in one process
# rmpl_ds.engine.GracefulStop in a stand-in loop (its "step" and "checkpoint" are sleeps): what one process does
# with SIGINT, a repeated signal and a second one. The launcher tests below send the signal to a real stage.

STOPPABLE = textwrap.dedent(
    """
    import sys, time
    from rmpl_ds.engine import GracefulStop

    stop = GracefulStop(repeat_window_s=float(sys.argv[1]))
    print("ready", flush=True)
    while not stop.requested:  # training steps
        time.sleep(0.02)
    print(f"finishing the step ({stop.signal_name})", flush=True)
    time.sleep(float(sys.argv[2]))  # the rest of the step and the final checkpoint
    print("checkpoint written", flush=True)
    """
)


def _stoppable(tmp_path: Path, window_s: float, finish_s: float) -> subprocess.Popen:
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    command = [sys.executable, str(script), str(window_s), str(finish_s)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_stand_in_loop_finishes_its_step_on_sigint_and_exits_0(tmp_path: Path) -> None:
    process = _stoppable(tmp_path, window_s=5.0, finish_s=0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "finishing the step (SIGINT)" in out and "checkpoint written" in out
    assert "SIGINT received: finishing the current step, then checkpointing" in err


def test_a_repeated_signal_within_the_window_is_the_same_request(tmp_path: Path) -> None:
    # Ctrl-C in a terminal reaches the launcher (which forwards it) and the ranks at once: one request, not two.
    process = _stoppable(tmp_path, window_s=30.0, finish_s=1.0)
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline().startswith("finishing the step")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "checkpoint written" in out and "aborting" not in err


def test_a_second_signal_after_the_window_aborts_at_once(tmp_path: Path) -> None:
    process = _stoppable(tmp_path, window_s=0.5, finish_s=120.0)
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().startswith("finishing the step (SIGTERM)")
    time.sleep(1.0)  # past the repeat window
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + signal.SIGTERM
    assert "second signal: aborting without a checkpoint" in err and "checkpoint written" not in out


# ------------------------------------------------------------------------------------- RELIABILITY.md is true

TEST_ID = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)(\[[^\]`]*\])?`")


def _table_test_ids() -> list[tuple[str, str]]:
    text = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("|") and "`tests/" in line]
    assert rows, "RELIABILITY.md has no table rows naming tests"
    ids = []
    for row in rows:
        found = TEST_ID.findall(row.split("|")[-2])  # the last column holds the tests
        assert found, f"RELIABILITY.md: a row without a test id in its last column: {row}"
        ids += [(path, name) for path, name, _ in found]
    return ids


def test_reliability_md_names_only_tests_that_exist() -> None:
    missing = []
    for path, name in _table_test_ids():
        source = ROOT / path
        if not source.is_file() or not re.search(rf"^def {name}\(", source.read_text(encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"


def test_every_reliability_and_bad_input_test_is_in_reliability_md() -> None:
    listed = set(_table_test_ids())
    checks_of_the_table = {
        "test_reliability_md_names_only_tests_that_exist",
        "test_every_reliability_and_bad_input_test_is_in_reliability_md",
    }
    unlisted = []
    for path in ("tests/test_reliability.py", "tests/test_bad_inputs.py"):
        for name in re.findall(r"^def (test_\w+)\(", (ROOT / path).read_text(encoding="utf-8"), re.M):
            if (path, name) not in listed and name not in checks_of_the_table:
                unlisted.append(f"{path}::{name}")
    assert not unlisted, f"add these tests to RELIABILITY.md: {unlisted}"


# ------------------------------------------------------------------------------------- slow: launcher runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, launcher_recipe) -> dict:
    """Demo shards of the Stage I sources and a 12-step recipe checkpointing every 2 steps (all kept)."""
    base = tmp_path_factory.mktemp("reliability")
    return {"base": base, "recipe": launcher_recipe(base, "reliability-test", steps=STEPS, keep_last=STEPS)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Launch:
    """One `rmpl-ds train` run (the launcher and its 2 ranks) with its output in a log file or a pipe."""

    def __init__(self, setup: dict, out: Path, *extra: str, env: dict[str, str] | None = None, pipe: bool = False):
        command = [sys.executable, "-m", "rmpl_ds", "train", str(setup["recipe"]), "--stage", "stage1"]
        command += ["--out", str(out), "--master-port", str(free_port()), *extra]
        self.log_path = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
        # A pipe where the ranks may not write files (RLIMIT_FSIZE applies to a log file, not to a pipe).
        sink: Any = subprocess.PIPE if pipe else self.log_path.open("w")
        environ = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=environ, text=True
        )
        self.pipe = pipe
        self.output = ""

    def wait(self, timeout: float = 600) -> int:
        if self.pipe:
            self.output, _ = self.process.communicate(timeout=timeout)
            self.log_path.write_text(self.output)
        else:
            self.process.wait(timeout=timeout)
            self.output = self.log_path.read_text()
        return self.process.returncode

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the run ended early:\n{self.log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.2)


def metric_lines(out: Path) -> list[dict]:
    """Every line of metrics.jsonl, in order (a resumed run appends the steps it repeats)."""
    path = out / "stage1" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def trained_state(ref: checkpoint.CheckpointRef) -> dict[str, Any]:
    """What an optimizer step changes: the trainable weights, each rank's fp32 partition and Adam state."""
    import torch

    # Our own checkpoints, just written by the run under test: DeepSpeed's files need full unpickling.
    model = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state: dict[str, Any] = {"module": model["module"]}
    for rank in (0, 1):
        optim = torch.load(
            ref.path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False
        )["optimizer_state_dict"]
        state[f"fp32_partition_{rank}"] = optim["single_partition_of_fp32_groups"]
        state[f"adam_{rank}"] = optim["base_optimizer_state"]["state"]
    return state


def scheduler_and_skips(ref: checkpoint.CheckpointRef) -> tuple[int, int]:
    import torch

    model = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return model["lr_scheduler"]["last_epoch"], model["skipped_steps"]


def same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def ref_at(out: Path, step: int) -> checkpoint.CheckpointRef:
    return checkpoint.CheckpointRef(out / "stage1" / "checkpoints", checkpoint.tag_for(step), step)


@pytest.fixture(scope="module")
def nan_then_kill(setup: dict) -> dict:
    """Run 1: NaN losses on rank 1 at NAN_STEPS, rank 1 SIGKILLed while writing the step-6 checkpoint.
    Run 2: `--resume auto` with the same NaN steps, until MAX_BAD_STEPS bad steps in a row stop the stage."""
    out = setup["base"] / "nan"
    root = out / "stage1" / "checkpoints"
    nan = {"RMPL_FAULT_NAN_STEPS": ",".join(map(str, NAN_STEPS)), "RMPL_FAULT_RANK": "1"}
    limit = f"stages.stage1.max_bad_steps={MAX_BAD_STEPS}"
    first = Launch(setup, out, limit, env={**nan, "RMPL_FAULT_KILL_IN_CHECKPOINT": "6"})
    found: dict[str, Any] = {"first_code": first.wait(), "first_metrics": metric_lines(out)}
    found["complete_after_kill"] = [ref.step for ref in checkpoint.complete_checkpoints(root)]
    found["step6_files_after_kill"] = sorted(p.name for p in (root / "step0000006").iterdir())
    found["latest_after_kill"] = (root / "latest").read_text()
    found["auto_after_kill"] = checkpoint.find(root, "auto")
    found["first_log"] = first.output
    second = Launch(setup, out, limit, env=nan)
    found["second_code"] = second.wait()
    found["second_log"] = second.output
    found["second_metrics"] = metric_lines(out)[len(found["first_metrics"]) :]
    found["out"] = out
    return found


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_complete_one(nan_then_kill: dict) -> None:
    found = nan_then_kill
    assert found["first_code"] != 0, found["first_log"][-3000:]
    assert "fault injection [rank 1]: SIGKILL in the middle of writing checkpoint 6" in found["first_log"]
    # The step-6 directory holds DeepSpeed's files but no seal: never chosen, `latest` still names step 4.
    assert found["complete_after_kill"] == [2, 4]
    assert "mp_rank_00_model_states.pt" in found["step6_files_after_kill"]
    assert checkpoint.MARKER not in found["step6_files_after_kill"]
    assert found["latest_after_kill"] == "step0000004" and found["auto_after_kill"].step == 4
    root = found["out"] / "stage1" / "checkpoints"
    assert f"resumed from {root / 'step0000004'}: step 4" in found["second_log"]
    # Steps 5 and 6 ran twice, before the kill and after the resume, with exactly the same results.
    before = {m["step"]: m for m in found["first_metrics"]}
    after = {m["step"]: m for m in found["second_metrics"]}
    assert before[6]["loss"] == after[6]["loss"] and math.isfinite(after[6]["loss"])
    assert before[6]["loss_by_stream"] == after[6]["loss_by_stream"]
    assert before[5]["skipped"] and after[5]["skipped"]
    assert (root / "step0000006" / checkpoint.MARKER).is_file()  # sealed by the resumed run


@pytest.mark.slow
def test_non_finite_losses_are_skipped_on_every_rank_and_counted(nan_then_kill: dict) -> None:
    metrics = {m["step"]: m for m in nan_then_kill["first_metrics"]}
    assert [step for step, m in sorted(metrics.items()) if m["skipped"]] == [3, 4, 5]
    assert [metrics[s]["bad_steps_in_a_row"] for s in range(1, 7)] == [0, 0, 1, 2, 3, 0]
    assert [metrics[s]["bad_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 3, 3]
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2, 6))
    assert all(math.isnan(metrics[s]["loss"]) for s in (3, 4, 5))
    # Only rank 1's losses were NaN, yet the weights, both ranks' fp32 partitions and Adam states after the
    # skipped steps 3-4 are bit for bit those of step 2: every rank skipped. The lr schedule did not advance.
    out = nan_then_kill["out"]
    assert same(trained_state(ref_at(out, 2)), trained_state(ref_at(out, 4)))
    (epoch2, skipped2), (epoch4, skipped4) = scheduler_and_skips(ref_at(out, 2)), scheduler_and_skips(ref_at(out, 4))
    assert epoch4 == epoch2 and skipped4 - skipped2 == 2
    assert metrics[3]["lr"] == metrics[4]["lr"] == metrics[5]["lr"] == metrics[6]["lr"]
    assert (
        "step 3 skipped: non-finite loss on some rank (1 in a row; the stage stops at 4)"
        in (nan_then_kill["first_log"])
    )


@pytest.mark.slow
def test_too_many_bad_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_state(nan_then_kill: dict) -> None:
    found = nan_then_kill
    assert found["second_code"] == 3, found["second_log"][-3000:]
    assert (
        "stage stage1 stopped after step 10: 4 steps in a row had a non-finite loss and were skipped, so "
        "checkpoint step0000010 holds the weights of step 6, the last good one" in found["second_log"]
    )
    # The count in a row survived the resume: step 5 was the third bad step in a row, not the first.
    after = {m["step"]: m for m in found["second_metrics"]}
    assert after[5]["bad_steps_in_a_row"] == 3
    assert [after[s]["bad_steps_in_a_row"] for s in (7, 8, 9, 10)] == [1, 2, 3, 4] and 11 not in after
    out = found["out"]
    root = out / "stage1" / "checkpoints"
    assert checkpoint.find(root, "auto").step == 10 and (root / "latest").read_text() == "step0000010"
    checkpoint.verify(ref_at(out, 10))
    assert same(trained_state(ref_at(out, 6)), trained_state(ref_at(out, 10)))
    assert not (out / "stage1" / "export").exists()  # a stage that stopped early exports nothing


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_the_collective_timeout(setup: dict) -> None:
    from rmpl_ds.commands.train import rank_processes

    out = setup["base"] / "hung"
    run = Launch(setup, out, "--collective-timeout", str(HUNG_RANK_TIMEOUT_S))
    ranks = []
    try:
        run.wait_for(lambda: len(metric_lines(out)) >= 1)
        ranks = rank_processes(run.process.pid)
        victim = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        victim.suspend()  # SIGSTOP: alive, holds its sockets, answers nothing
        stopped_at = time.monotonic()
        code = run.wait(timeout=HUNG_RANK_TIMEOUT_S + LAUNCHER_GRACE_S + 120)
        elapsed = time.monotonic() - stopped_at
    finally:
        for rank in ranks:  # whatever the outcome, leave no stopped rank behind
            if rank.is_running():
                rank.kill()
    assert code != 0
    assert elapsed < HUNG_RANK_TIMEOUT_S + LAUNCHER_GRACE_S + 45, elapsed
    assert f"Timed out waiting {HUNG_RANK_TIMEOUT_S * 1000}ms" in run.output
    assert "rmpl_ds.train [rank 0]: error: a collective failed" in run.output and "another rank hung" in run.output


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_names_the_path_and_keeps_earlier_checkpoints(setup: dict) -> None:
    out = setup["base"] / "disk-full"
    run = Launch(setup, out, env={"RMPL_FAULT_DISK_FULL_AT_CHECKPOINT": "4"}, pipe=True)
    assert run.wait() == 2, run.output[-3000:]
    root = out / "stage1" / "checkpoints"
    assert f"error: cannot write checkpoint {root / 'step0000004'}: " in run.output
    assert f"earlier checkpoints in {root} are intact" in run.output
    assert "Traceback" not in run.output
    assert [ref.step for ref in checkpoint.complete_checkpoints(root)] == [2]
    assert (root / "latest").read_text() == "step0000002" and checkpoint.find(root, "auto").step == 2
    checkpoint.verify(ref_at(out, 2))
    assert not (root / "step0000004" / checkpoint.MARKER).exists()


@pytest.fixture(scope="module")
def interrupted(setup: dict) -> dict:
    """A run stopped by SIGINT to `rmpl-ds train` (what Ctrl-C does), which forwards it to the ranks."""
    out = setup["base"] / "sigint"
    run = Launch(setup, out)
    run.wait_for(lambda: len(metric_lines(out)) >= 1)
    run.process.send_signal(signal.SIGINT)
    return {"code": run.wait(timeout=120), "log": run.output, "out": out}


@pytest.mark.slow
def test_sigint_stops_a_stage_with_a_checkpoint_and_exit_0(interrupted: dict) -> None:
    assert interrupted["code"] == 0, interrupted["log"][-3000:]
    assert "SIGINT received: finishing the current step, then checkpointing" in interrupted["log"]
    root = interrupted["out"] / "stage1" / "checkpoints"
    stopped_at = checkpoint.find(root, "auto")
    assert stopped_at is not None and stopped_at.step < STEPS
    assert f"stopped after step {stopped_at.step} (SIGINT); resume with --resume auto" in interrupted["log"]
    assert len({m["step"] for m in metric_lines(interrupted["out"])}) == stopped_at.step


@pytest.mark.slow
def test_a_tampered_checkpoint_is_never_loaded(setup: dict, interrupted: dict) -> None:
    out = interrupted["out"]
    root = out / "stage1" / "checkpoints"
    refs = checkpoint.complete_checkpoints(root)
    for ref in refs:  # every sealed checkpoint of the stopped run
        victim = ref.path / "mp_rank_00_model_states.pt"
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    lines_before = len(metric_lines(out))
    # Named explicitly: refused, naming the file.
    newest = refs[-1].path / "mp_rank_00_model_states.pt"
    run = Launch(setup, out, "--resume", str(refs[-1].path))
    assert run.wait() == 2, run.output[-3000:]
    assert f"{newest}: modified since the checkpoint was written; refusing to load it" in run.output
    assert "stage stage1:" not in run.output  # refused before the process group, the model and any step
    # --resume auto skips a damaged checkpoint for the newest intact one (tests/test_elastic.py); with none intact
    # it refuses, naming each, rather than silently starting over.
    run = Launch(setup, out, "--resume", "auto")
    assert run.wait() == 2, run.output[-3000:]
    assert f"{root}: every sealed checkpoint is damaged, so --resume auto has nothing to resume from" in run.output
    assert f"{newest}: modified since the checkpoint was written" in run.output
    assert "stage stage1:" not in run.output and len(metric_lines(out)) == lines_before
