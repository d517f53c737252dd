"""Run one stage of a recipe under the deepspeed launcher (one process per GPU; 2 CPU ranks without a GPU).

    rmpl-ds train launch/recipes/rmpl_qwen2vl_7b.yaml --stage stage1 --gpus 2
    rmpl-ds train RECIPE --stage stage2 --resume auto stages.stage2.lr=2e-5
    rmpl-ds train RECIPE --stage stage1 --hostfile launch/hostfile.example --gpus 8   # several nodes, over ssh
    rmpl-ds train RECIPE --stage stage1 --gpus 8 --no-ssh --num-nodes 2 --node-rank R --master-addr NODE0 \\
        --master-port 29500                       # on each node R, e.g. under SLURM or Kubernetes (no ssh)

Before anything starts, the recipe is validated for the world size (gpus per node x nodes) and rmpl_ds.preflight
checks, listing every problem at once: the model directory (a Hugging Face one of the recipe's family), the
``init_from`` export of a stage started alone, every shard set the stage reads in full (re-hashed and re-indexed, as
`rmpl-ds shards verify` does; ``--skip-shard-verify`` leaves that to the ranks' quick checks of manifests, indexes
and sizes), room for the checkpoints in the output directory and, on a GPU host, the memory planner's verdict
(``--force`` overrides). A problem stops here with exit 2, before any process or run folder exists. The launched
command is ``deepspeed --num_gpus N [--hostfile F] --module rmpl_ds.train RECIPE --stage NAME ...``.

Several nodes: with ``--hostfile`` the launcher on this node starts every node's ranks over ssh (pdsh). Without ssh
(SLURM, Kubernetes), run ``rmpl-ds train`` once on every node with the same arguments except ``--node-rank``:
``--no-ssh --num-nodes N --node-rank R --master-addr ADDRESS_OF_NODE_0 --master-port P``; each starts its node's
ranks (``deepspeed --no_ssh --node_rank R`` with a hostfile of N nodes written for it when none is given). Every node
must see the same run directory on a shared filesystem; the ranks check that before anything trains.

Resume: ``--resume auto`` (the default) continues from the newest intact checkpoint of the stage (a damaged one
is skipped, with a warning naming it), ``--resume PATH`` from a given checkpoint directory, ``--resume none`` starts
over; ``--stop-after STEP`` checkpoints and exits 0 after that step. The world size may differ from the
checkpoint's (it is then loaded from DeepSpeed's universal format, converted once and kept beside it). Checkpoints
are verified against the hashes written with them; never resume from a checkpoint you did not write (DeepSpeed's
files are pickles).

Stopping: SIGTERM or Ctrl-C finishes the current step, writes a checkpoint and exits 0; a second one (more than
5 s later) aborts at once. A rank that dies makes the launcher stop the others; one that hangs makes the others
give up after ``--collective-timeout`` seconds (default 1800), and the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rmpl_ds.log import VERBOSE_ENV

HELP = "run one stage of a recipe under the deepspeed launcher"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    parser.add_argument("--stage", required=True, help="the stage to run")
    parser.add_argument("--gpus", type=int, default=None, help="processes per node (default: the recipe's launch.gpus)")
    parser.add_argument("--hostfile", default=None, help="deepspeed hostfile for several nodes")
    parser.add_argument(
        "--num-nodes", type=int, default=None, help="nodes in the job (default: the hostfile's, else launch.nodes)"
    )
    parser.add_argument(
        "--no-ssh",
        action="store_true",
        help="start only this node's ranks (one rmpl-ds train per node, e.g. under SLURM or Kubernetes); needs "
        "--node-rank and, with several nodes, --master-addr",
    )
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank, 0 .. nodes-1 (with --no-ssh)")
    parser.add_argument("--master-addr", default=None, help="address of node rank 0, reachable from every node")
    parser.add_argument("--out", default=None, help="run directory (default: the recipe's output_dir)")
    parser.add_argument("--resume", default="auto", help="auto, none, or a checkpoint directory")
    parser.add_argument("--new-phase", action="store_true", help="resume although the data mixture or shards changed")
    parser.add_argument("--force", action="store_true", help="start although the memory planner says it does not fit")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: deepspeed's)")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit 0 after this optimizer step (a planned stop; resume with --resume auto)",
    )
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="ranks give up on a collective after this long (default: $RMPL_COLLECTIVE_TIMEOUT_S or 1800)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the launcher's, DeepSpeed's and transformers' output too (always written to <stage>/train.log)",
    )
    parser.add_argument(
        "--skip-shard-verify",
        action="store_true",
        help="do not re-hash the stage's shard sets before starting (the ranks still check manifests and sizes)",
    )


def launcher_command(args: argparse.Namespace, gpus: int, hostfile: str | None = None) -> list[str]:
    """The deepspeed launcher's command line; ``hostfile`` replaces ``--hostfile`` (the one written for --no-ssh)."""
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    command = [deepspeed or "deepspeed", "--num_gpus", str(gpus)]
    hostfile = hostfile or args.hostfile
    if hostfile:
        command += ["--hostfile", hostfile]
    if args.num_nodes:
        command += ["--num_nodes", str(args.num_nodes)]
    if args.no_ssh:
        command += ["--no_ssh", "--node_rank", str(args.node_rank)]
    if args.master_addr:
        command += ["--master_addr", args.master_addr]
    if args.master_port:
        command += ["--master_port", str(args.master_port)]
    command += ["--module", "rmpl_ds.train", args.recipe, "--stage", args.stage, "--resume", args.resume]
    if args.out:
        command += ["--out", args.out]
    if args.new_phase:
        command.append("--new-phase")
    if args.collective_timeout is not None:
        command += ["--collective-timeout", str(args.collective_timeout)]
    if args.stop_after is not None:
        command += ["--stop-after", str(args.stop_after)]
    return command + list(args.overrides)


def node_count(args: argparse.Namespace, recipe_nodes: int) -> int:
    """Nodes in the job: ``--num-nodes``, else the hostfile's, else the recipe's ``launch.nodes``. Raises UserError
    for multi-node options that do not fit together (before anything starts)."""
    from rmpl_ds.errors import UserError

    listed = _hostfile_nodes(args.hostfile) if args.hostfile else None
    nodes = args.num_nodes or listed or recipe_nodes
    problems = []
    if args.num_nodes is not None and args.num_nodes < 1:
        problems.append(f"--num-nodes must be at least 1, got {args.num_nodes}")
    if listed is not None and args.num_nodes and args.num_nodes > listed:
        problems.append(f"--num-nodes {args.num_nodes}: the hostfile {args.hostfile} lists only {listed} node(s)")
    if args.no_ssh:
        if args.node_rank is None or not 0 <= args.node_rank < nodes:
            problems.append(f"--no-ssh needs --node-rank between 0 and {nodes - 1} (this node's rank of {nodes})")
        if nodes > 1 and not args.master_addr:
            problems.append(f"--no-ssh with {nodes} nodes needs --master-addr (the address of node rank 0)")
    else:
        if args.node_rank is not None:
            problems.append("--node-rank goes with --no-ssh (one rmpl-ds train per node)")
        if nodes > 1 and not args.hostfile:
            problems.append(
                f"{nodes} nodes need --hostfile (the launcher starts every node over ssh) or --no-ssh with "
                "--node-rank (one rmpl-ds train per node)"
            )
    if args.stop_after is not None and args.stop_after < 1:
        problems.append(f"--stop-after must be a step >= 1, got {args.stop_after}")
    if problems:
        raise UserError("; ".join(problems))
    return nodes


def preflight(args: argparse.Namespace) -> tuple[int, Path]:
    """Validate everything that can be checked before a process starts (rmpl_ds.preflight, every problem at once);
    returns the ranks per node, the nodes and the stage's directory."""
    from rmpl_ds import preflight as checks
    from rmpl_ds.config import load_recipe
    from rmpl_ds.ds_config import recipe_ds_config
    from rmpl_ds.engine import collective_timeout_s

    base = load_recipe(args.recipe, args.overrides)
    gpus = args.gpus or base.launch.gpus
    nodes = node_count(args, base.launch.nodes)
    recipe = load_recipe(args.recipe, args.overrides, world_size=gpus * nodes)
    recipe.stage(args.stage)
    recipe_ds_config(recipe.launch)
    collective_timeout_s(args.collective_timeout)
    scope = checks.Scope(
        stages=(args.stage,),
        run_dir=Path(args.out) if args.out else recipe.out_dir(),
        world_size=gpus * nodes,
        verify_shards=not args.skip_shard_verify,
        gpu_memory_gib=checks.gpu_memory_gib(),
        force=args.force,
    )
    checks.check_or_raise(recipe, scope)
    return gpus, nodes, scope.run_dir / args.stage


def _hostfile_nodes(hostfile: str) -> int:
    from rmpl_ds.errors import UserError

    try:
        lines = Path(hostfile).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"{hostfile}: cannot read the hostfile: {error.strerror}") from None
    nodes = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not nodes:
        raise UserError(f"{hostfile}: no hosts listed")
    return len(nodes)


def rank_processes(launcher_pid: int) -> list[Any]:
    """The training ranks under a launcher (deepspeed's runner starts launch.py, which starts the ranks)."""
    import psutil

    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            # launch.py's own command line names the module too; only the ranks carry --local_rank=N.
            if "rmpl_ds.train" in cmdline and any(arg.startswith("--local_rank=") for arg in cmdline):
                ranks.append(child)
    return ranks


def run(args: argparse.Namespace) -> int:
    gpus, nodes, stage_dir = preflight(args)
    env = dict(
        os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    )
    if args.verbose:
        env[VERBOSE_ENV] = "1"  # the ranks keep the libraries' own output too
    stage_dir.mkdir(parents=True, exist_ok=True)
    # With --no-ssh every node runs its own rmpl-ds train, and they share the stage directory: one log per node.
    log_path = stage_dir / (f"train.node{args.node_rank}.log" if args.no_ssh and args.node_rank else LOG_NAME)
    with tempfile.TemporaryDirectory(prefix="rmpl-ds-train-") as scratch:
        hostfile = None
        if args.no_ssh and not args.hostfile:
            # deepspeed --no_ssh reads the nodes and their ranks per node from a hostfile; the names are only keys.
            hostfile = str(Path(scratch) / "hostfile")
            Path(hostfile).write_text("".join(f"node{n} slots={gpus}\n" for n in range(nodes)), encoding="utf-8")
        command = launcher_command(args, gpus, hostfile)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return _supervise(process, args, log_path)


def _supervise(process: subprocess.Popen, args: argparse.Namespace, log_path: Path) -> int:
    """Relay the launcher's output and forward SIGTERM / SIGINT to its ranks until it exits; its exit code."""
    import psutil

    def forward(signum: int, frame: object) -> None:
        # Straight to the ranks: they finish the step, checkpoint and exit 0, so the launcher exits 0 too (the
        # launcher itself, when signalled, kills its ranks and exits 1 whatever they did).
        ranks = rank_processes(process.pid) if process.poll() is None else []
        for rank in ranks or [process]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                rank.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with log_path.open("ab") as log:
            log.write(f"==== rmpl-ds train {' '.join(sys.argv[1:])}\n".encode())
            relay(process.stdout, log, sys.stderr, everything=args.verbose)
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code != 0:
        tail = log_path.read_bytes().decode(errors="replace").splitlines()[-TAIL_LINES:]
        print(f"rmpl-ds train: the launcher exited {code}; the last lines of {log_path}:", file=sys.stderr)
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
    return code


# The console shows the package's own lines (rank 0's log, every rank's error line, fault-injection notices); the
# launcher's and the libraries' INFO lines, warnings and progress bars go to <stage dir>/train.log only.
CONSOLE_LINE = re.compile(
    rb"^\d\d:\d\d:\d\d (?:INFO|WARNING|ERROR|CRITICAL) \[rank \d+\] rmpl_ds|^rmpl_ds[.\w]* \[rank \d+\]: |^rmpl_ds "
)
LOG_NAME = "train.log"
TAIL_LINES = 20


def relay(source: Any, log: Any, console: Any, *, everything: bool = False) -> None:
    """Copy the launcher's output (``source``, bytes) to ``log``; echo the package's own lines to ``console``."""
    for line in iter(source.readline, b""):
        log.write(line)
        log.flush()
        if everything or CONSOLE_LINE.match(line):
            console.write(line.decode(errors="replace"))
            console.flush()
