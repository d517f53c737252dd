"""Elastic and multi-node runs: a world size that changes on resume, nodes started without ssh, run directories the
ranks do not share, and damaged checkpoints that `--resume auto` skips.

The launcher tests run the real `rmpl-ds train` (gloo CPU ranks, the tiny Qwen2-VL, demo shards); two "nodes" are
two `rmpl-ds train --no-ssh` processes on 127.0.0.1. One uninterrupted 2-rank run is the reference. A CPU run is
deterministic, so a resumed run's losses are compared bit for bit wherever the arithmetic is the same: at the same
world size (one or two nodes give the same ranks), and after a world-size change at the first resumed step, whose
loss depends only on the restored weights, the data of its slots and its dropout masks (drawn per micro-batch from
(seed, slot)). From the next step on, the gradients are summed over another number of ranks, in another order, so
the losses agree to rounding (measured: up to 2.1e-4 relative, growing over the steps) but not bit for bit; a
resume that lost the Adam moments is 2.6e-3 off at the next step, well outside the tolerance used here (5e-4).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, Launched, free_port, metric_lines, resume_trace

from rmpl_ds import checkpoint, dist, engine, train
from rmpl_ds.commands import train as train_command
from rmpl_ds.errors import UserError
from rmpl_ds.mixing import batch_slots

STEPS = 8
# How close the losses of a run resumed on another world size stay to the run it continues, after its first step.
REL_TOLERANCE = 5e-4


# ------------------------------------------------------------------------------------------ fast: checkpoints


def sealed(root: Path, step: int, world: int = 2) -> checkpoint.CheckpointRef:
    """A sealed checkpoint as `checkpoint.save` lays it out (model states + one optimizer shard per rank), with
    stand-in bytes: nothing here is ever unpickled."""
    ref = checkpoint.CheckpointRef(root, checkpoint.tag_for(step), step)
    ref.path.mkdir(parents=True)
    names = ["mp_rank_00_model_states.pt"] + [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    for name in names:
        (ref.path / name).write_bytes(f"{name} at step {step}".encode())
    marker = {
        "tag": ref.tag,
        "step": step,
        "world_size": world,
        "ranks": [[name for name in names if checkpoint.file_writer(name) == r] for r in range(world)],
        "files": checkpoint.checkpoint_hashes(ref.path),
    }
    (ref.path / checkpoint.MARKER).write_text(json.dumps(marker))
    (root / checkpoint.LATEST).write_text(ref.tag)
    return ref


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The package's warnings (its logger does not propagate once a command has set it up)."""
    logger = logging.getLogger("rmpl_ds")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="rmpl_ds")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_resume_auto_skips_damaged_checkpoints_for_the_newest_intact_one(tmp_path: Path, warnings) -> None:
    root = tmp_path / "checkpoints"
    refs = {step: sealed(root, step) for step in (2, 4, 6, 8, 10)}
    (root / checkpoint.LATEST).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")  # not text: used to crash every rank
    (refs[10].path / "mp_rank_00_model_states.pt").write_bytes(b"altered")
    (refs[8].path / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (refs[6].path / "stray.pt").write_bytes(b"a file the seal does not list")
    (refs[4].path / checkpoint.MARKER).write_bytes(b"\xff\x00 not a seal")
    chosen = checkpoint.find(root, "auto")
    assert chosen == refs[2]
    text = warnings.text
    for step, why in (
        (10, "mp_rank_00_model_states.pt: modified since the checkpoint was written"),
        (8, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: missing since the checkpoint was written"),
        (6, "stray.pt: unexpected since the checkpoint was written"),
        (4, f"{checkpoint.MARKER}: unreadable seal"),
    ):
        assert f"checkpoint {refs[step].path} is damaged (" in text and why in text
    assert f"checkpoint pointer {root / checkpoint.LATEST} is unreadable (not text); resuming from step0000002" in text
    # Named explicitly, a damaged checkpoint is refused, not replaced by another.
    with pytest.raises(UserError, match=r"step0000010/mp_rank_00_model_states.pt: modified since"):
        checkpoint.find(root, str(refs[10].path))
    assert checkpoint.find(root, str(refs[2].path)) == refs[2]


def test_resume_auto_refuses_when_every_sealed_checkpoint_is_damaged(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (sealed(root, step).path / "mp_rank_00_model_states.pt").write_bytes(b"altered")
    with pytest.raises(UserError) as refused:
        checkpoint.find(root, "auto")
    message = str(refused.value)
    assert message.startswith(f"{root}: every sealed checkpoint is damaged, so --resume auto has nothing")
    assert "step0000002" in message and "step0000004" in message and "start over with --resume none" in message
    # Unsealed directories (a crash mid-write) are not damaged checkpoints: with nothing sealed, a fresh start.
    assert checkpoint.find(tmp_path / "elsewhere", "auto") is None


def test_a_seal_must_cover_every_ranks_optimizer_shard(tmp_path: Path, warnings) -> None:
    # What node-local run directories used to produce: rank 0 sealed a 2-rank checkpoint holding its own shard only.
    root = tmp_path / "checkpoints"
    intact = sealed(root, 2)
    partial = sealed(root, 4, world=1)
    marker = json.loads((partial.path / checkpoint.MARKER).read_text())
    (partial.path / checkpoint.MARKER).write_text(json.dumps({**marker, "world_size": 2}))
    with pytest.raises(UserError, match=r"sealed for 2 ranks but holds no optimizer shard of rank\(s\) \[1\]"):
        checkpoint.verify(partial)
    assert checkpoint.find(root, "auto") == intact
    assert f"checkpoint {partial.path} is damaged" in warnings.text


def test_ranks_that_would_resume_from_different_checkpoints_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What each rank chose, as the collective (dist.all_gather_object) returns it: here rank 1 found no checkpoint
    # (started with another --resume, or seeing another directory).
    ref = sealed(tmp_path / "checkpoints", 4)
    chosen = [(ref.tag, checkpoint.seal_digest(ref)), None]
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [mine, *chosen[1:]] if mine else chosen)
    with pytest.raises(UserError) as refused:
        train.agree_on_checkpoint(ref)
    assert str(refused.value).startswith(
        f"the ranks would resume from different checkpoints (rank 0: step0000004 (seal {chosen[0][1][:12]}), rank 1: "
        "no checkpoint); start every node with the same --resume, and every rank must see the same run directory"
    )
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [mine, mine])
    train.agree_on_checkpoint(ref)  # the same checkpoint (tag and seal) everywhere: agreed


def test_dropout_masks_depend_on_the_slot_not_on_the_rank_or_the_world_size() -> None:
    def seeds(world: int, step: int) -> list[int]:
        micro_batches = [mb for rank in range(world) for mb in batch_slots(step, 8, world, 2, rank, first_slot=16)]
        return sorted(engine.dropout_seed(42, micro_batch[0]) for micro_batch in micro_batches)

    assert seeds(1, 0) == seeds(2, 0) == seeds(4, 0)  # the same micro-batches get the same seeds
    assert len(set(seeds(2, 0))) == 4 and not set(seeds(2, 0)) & set(seeds(2, 1))
    assert engine.dropout_seed(42, 16) != engine.dropout_seed(43, 16)


# ------------------------------------------------------------------------------------ fast: the CLI's options


def parse_train(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    return parser.parse_args(["recipe.yaml", "--stage", "stage1", *argv])


def test_train_passes_the_launchers_multi_node_options() -> None:
    args = parse_train(
        "--gpus", "8", "--num-nodes", "2", "--node-rank", "1", "--no-ssh", "--master-addr", "10.0.0.7",
        "--master-port", "29500", "--stop-after", "100",
    )  # fmt: skip
    assert train_command.node_count(args, recipe_nodes=1) == 2
    command = train_command.launcher_command(args, 8, hostfile="/tmp/hosts")
    launcher, module = command[: command.index("--module")], command[command.index("--module") :]
    assert launcher[1:] == [
        "--num_gpus", "8", "--hostfile", "/tmp/hosts", "--num_nodes", "2", "--no_ssh", "--node_rank", "1",
        "--master_addr", "10.0.0.7", "--master_port", "29500",
    ]  # fmt: skip
    assert module[-2:] == ["--stop-after", "100"]
    # Over ssh the launcher starts every node from this one: the hostfile's nodes, no node rank.
    args = parse_train("--hostfile", str(ROOT / "launch" / "hostfile.example"))
    assert train_command.node_count(args, recipe_nodes=1) == 2
    assert "--no_ssh" not in train_command.launcher_command(args, 2)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("--no-ssh", "--num-nodes", "2", "--master-addr", "a"), "--no-ssh needs --node-rank between 0 and 1"),
        (("--no-ssh", "--num-nodes", "2", "--node-rank", "2", "--master-addr", "a"), "--node-rank between 0 and 1"),
        (("--no-ssh", "--num-nodes", "2", "--node-rank", "0"), "--no-ssh with 2 nodes needs --master-addr"),
        (("--node-rank", "0",), "--node-rank goes with --no-ssh"),
        (("--num-nodes", "2",), "2 nodes need --hostfile (the launcher starts every node over ssh) or --no-ssh"),
        (("--stop-after", "0",), "--stop-after must be a step >= 1, got 0"),
    ],
)  # fmt: skip
def test_multi_node_options_that_do_not_fit_are_refused(argv: tuple[str, ...], problem: str) -> None:
    with pytest.raises(UserError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        train_command.node_count(parse_train(*argv), recipe_nodes=1)


# ------------------------------------------------------------------------------------------ slow: launcher runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, launcher_recipe) -> dict:
    """test_train.py's Stage I, keeping every checkpoint (every 2 steps)."""
    base = tmp_path_factory.mktemp("elastic")
    return {"base": base, "recipe": launcher_recipe(base, "elastic-test", steps=STEPS, keep_last=STEPS)}


def start(setup: dict, out: Path, *extra: str, gpus: int = 2, port: int | None = None, name: str = "") -> Launched:
    """`rmpl-ds train` of Stage I into ``out`` (not waited for); its output goes to a log file beside ``out``."""
    command = [sys.executable, "-m", "rmpl_ds", "train", str(setup["recipe"]), "--stage", "stage1", "--out", str(out)]
    command += ["--gpus", str(gpus), "--master-port", str(port or free_port()), *extra]
    log = setup["base"] / f"{out.name}{name}-{len(list(setup['base'].glob('*.log')))}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    return Launched(process, log)


def finish(*runs: Launched, code: int = 0) -> str:
    """Wait for ``runs``; each must exit with ``code``. Their output, joined."""
    for run in runs:
        assert run.process.wait(timeout=600) == code, run.log.read_text()[-4000:]
    return "\n".join(run.log.read_text() for run in runs)


def two_nodes(setup: dict, outs: tuple[Path, Path], *extra: str) -> list[Launched]:
    """Two nodes of one rank each, started without ssh: two `rmpl-ds train --no-ssh` on 127.0.0.1."""
    port = free_port()
    return [
        start(
            setup, outs[node], "--num-nodes", "2", "--node-rank", str(node), "--no-ssh", "--master-addr",
            "127.0.0.1", *extra, gpus=1, port=port, name=f"-node{node}",
        )
        for node in (0, 1)
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metric_lines(out)}


def lrs(out: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in metric_lines(out)}


@pytest.fixture(scope="module")
def reference(setup: dict) -> Path:
    """The uninterrupted 2-rank run (checkpoints at steps 2, 4, 6, 8)."""
    out = setup["base"] / "reference"
    finish(start(setup, out))
    return out


@pytest.fixture(scope="module")
def one_rank(setup: dict, reference: Path) -> dict:
    """The reference's step-4 checkpoint (2 ranks) resumed on 1 rank to the end."""
    ref = checkpoint.find(reference / "stage1" / "checkpoints", str(reference / "stage1/checkpoints/step0000004"))
    out = setup["base"] / "one-rank"
    log = finish(start(setup, out, "--resume", str(ref.path), gpus=1))
    return {"out": out, "from": ref, "log": log}


def assert_continues(resumed: Path, first_step: int, reference: Path) -> None:
    """The resumed run logged steps ``first_step``..STEPS: the first with the reference's loss bit for bit, the rest
    to rounding (another world size sums the gradients in another order); the lr schedule exactly."""
    got, expected = losses(resumed), losses(reference)
    assert sorted(got) == list(range(first_step, STEPS + 1))
    assert got[first_step] == expected[first_step]
    assert [got[s] for s in sorted(got)[1:]] == pytest.approx([expected[s] for s in sorted(got)[1:]], rel=REL_TOLERANCE)
    assert lrs(resumed) == {s: lr for s, lr in lrs(reference).items() if s >= first_step}


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank(one_rank: dict, reference: Path) -> None:
    source, log = one_rank["from"], one_rank["log"]
    universal = source.path / checkpoint.UNIVERSAL
    assert f"world size changed (2 -> 1): resuming {source.path} from DeepSpeed's universal checkpoint format" in log
    assert f"converted {source.path} to DeepSpeed's universal format in " in log
    assert "world size changed (2 -> 1): the checkpoint holds the RNG states of 2 ranks, so each rank's RNGs" in log
    assert "Dropout does not depend on them: it is drawn per micro-batch from the stage seed" in log
    (trace,) = resume_trace(one_rank["out"])
    assert trace["checkpoint"] == str(source.path) and (trace["step"], trace["next_slot"]) == (4, 16)
    assert (trace["saved_world_size"], trace["world_size"], trace["universal"]) == (2, 1, str(universal))
    assert_continues(one_rank["out"], 5, reference)
    # The universal form is cached beside the checkpoint under its own seal; the checkpoint itself still verifies.
    assert checkpoint.intact_universal(source) == checkpoint.universal_ref(source)
    checkpoint.verify(source)
    # What the 1-rank run wrote is a 1-rank checkpoint.
    written = json.loads((one_rank["out"] / "stage1/checkpoints/step0000008" / checkpoint.MARKER).read_text())
    assert written["world_size"] == 1 and written["ranks"] == [sorted(written["files"])]


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_resumes_on_two_ranks(
    setup: dict, one_rank: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The 1-rank run's checkpoints of steps 6 and 8, the newest damaged and `latest` holding bytes that are not text.
    out = setup["base"] / "damaged"
    root = out / "stage1" / "checkpoints"
    root.mkdir(parents=True)
    for tag in ("step0000006", "step0000008"):
        shutil.copytree(one_rank["out"] / "stage1" / "checkpoints" / tag, root / tag)
    victim = root / "step0000008" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    (root / checkpoint.LATEST).write_bytes(b"\x00\xff\xfe step0000008 \x80")
    log = finish(start(setup, out, "--resume", "auto", gpus=2))
    source = checkpoint.CheckpointRef(root, checkpoint.tag_for(6), 6)
    assert f"checkpoint {root / 'step0000008'} is damaged ({victim}: modified since the checkpoint was written" in log
    assert f"checkpoint pointer {root / 'latest'} is unreadable (not text); resuming from step0000006" in log
    assert f"world size changed (1 -> 2): resuming {source.path} from DeepSpeed's universal" in log
    assert f"resumed from {source.path}: step 6, next slot 24" in log
    (trace,) = resume_trace(out)
    assert (trace["step"], trace["saved_world_size"], trace["world_size"]) == (6, 1, 2)
    assert_continues(out, 7, one_rank["out"])
    checkpoint.verify(checkpoint.find(root, "auto"))  # the damaged step 8 was replaced by a sealed one
    # Converted once: another resume of step 6 on another world size loads the cached form without converting ...
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("converted a cached checkpoint again"))
    assert checkpoint.convert_to_universal(source) == checkpoint.universal_ref(source)
    # ... unless it was altered since: then it is not used.
    victim = next(iter(sorted(checkpoint.universal_ref(source).path.rglob("*.pt"))))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert checkpoint.intact_universal(source) is None


@pytest.fixture(scope="module")
def nodes(setup: dict) -> dict:
    """Two nodes stopped after step 4 (--stop-after), then resumed."""
    out = setup["base"] / "two-nodes"
    found = {"out": out, "stopped": finish(*two_nodes(setup, (out, out), "--stop-after", "4"))}
    found["metrics_after_stop"] = metric_lines(out)
    found["resumed"] = finish(*two_nodes(setup, (out, out)))
    return found


@pytest.mark.slow
def test_two_nodes_without_ssh_stop_and_resume_exactly(nodes: dict, reference: Path) -> None:
    out = nodes["out"]
    assert "stopped after step 4 (--stop-after); resume with --resume auto" in nodes["stopped"]
    assert [m["step"] for m in nodes["metrics_after_stop"]] == [1, 2, 3, 4]
    (trace,) = resume_trace(out)
    assert trace["checkpoint"] == str(out / "stage1" / "checkpoints" / "step0000004") and trace["step"] == 4
    assert (trace["world_size"], trace["saved_world_size"], trace["universal"]) == (2, 2, None)
    # One node x 2 ranks or two nodes x 1 rank: the same ranks, the same losses, bit for bit.
    assert losses(out) == losses(reference)
    seal = json.loads((out / "stage1/checkpoints/step0000008" / checkpoint.MARKER).read_text())
    assert seal["world_size"] == 2 and seal["ranks"][1] == ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (out / "stage1" / "train.log").is_file() and (out / "stage1" / "train.node1.log").is_file()


@pytest.mark.slow
def test_node_local_run_directories_are_refused_before_training(setup: dict) -> None:
    # Each node writes its own directory: what node-local disks give (here two paths on one machine).
    outs = (setup["base"] / "node-local-a", setup["base"] / "node-local-b")
    output = finish(*two_nodes(setup, outs), code=2)
    for rank in (0, 1):
        assert f"rmpl_ds.train [rank {rank}]: error: the run directory is not shared: rank 1 (host " in output
    assert f"{outs[1] / 'stage1'}) cannot see the file rank 0 (host " in output
    assert "on a filesystem shared by all nodes (NFS, Lustre, a shared volume)" in output
    assert "Traceback" not in output
    for out in outs:  # nothing trained, nothing checkpointed
        assert not (out / "stage1" / "metrics.jsonl").exists() and not (out / "stage1" / "checkpoints").exists()
