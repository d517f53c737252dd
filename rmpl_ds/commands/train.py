"""Run one stage of a recipe under the deepspeed launcher (one process per GPU; 2 CPU ranks without a GPU).

    rmpl-ds train launch/recipes/rmpl_qwen2vl_7b.yaml --stage stage1 --gpus 2
    rmpl-ds train RECIPE --stage stage2 --resume auto stages.stage2.lr=2e-5
    rmpl-ds train RECIPE --stage stage1 --hostfile launch/hostfile.example --gpus 8   # several nodes

Before anything starts, the recipe is validated for the world size (gpus per node x nodes) and rmpl_ds.preflight
checks, listing every problem at once: the model directory (a Hugging Face one of the recipe's family), the
``init_from`` export of a stage started alone, every shard set the stage reads in full (re-hashed and re-indexed, as
`rmpl-ds shards verify` does; ``--skip-shard-verify`` leaves that to the ranks' quick checks of manifests, indexes
and sizes), room for the checkpoints in the output directory and, on a GPU host, the memory planner's verdict
(``--force`` overrides). A problem stops here with exit 2, before any process or run folder exists. The launched
command is ``deepspeed --num_gpus N [--hostfile F] --module rmpl_ds.train RECIPE --stage NAME ...``.

Resume: ``--resume auto`` (the default) continues from the newest complete checkpoint of the stage, ``--resume
PATH`` from a given checkpoint directory, ``--resume none`` starts over. Checkpoints are verified against the
hashes written with them; never resume from a checkpoint you did not write (DeepSpeed's files are pickles).

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
    parser.add_argument("--out", default=None, help="run directory (default: the recipe's output_dir)")
    parser.add_argument("--resume", default="auto", help="auto, none, or a checkpoint directory")
    parser.add_argument("--new-phase", action="store_true", help="resume although the data mixture or shards changed")
    parser.add_argument("--force", action="store_true", help="start although the memory planner says it does not fit")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: deepspeed's)")
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


def launcher_command(args: argparse.Namespace, gpus: int) -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    command = [deepspeed or "deepspeed", "--num_gpus", str(gpus)]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    if args.master_port:
        command += ["--master_port", str(args.master_port)]
    command += ["--module", "rmpl_ds.train", args.recipe, "--stage", args.stage, "--resume", args.resume]
    if args.out:
        command += ["--out", args.out]
    if args.new_phase:
        command.append("--new-phase")
    if args.collective_timeout is not None:
        command += ["--collective-timeout", str(args.collective_timeout)]
    return command + list(args.overrides)


def preflight(args: argparse.Namespace) -> tuple[int, Path]:
    """Validate everything that can be checked before a process starts (rmpl_ds.preflight, every problem at once);
    returns the ranks per node and the stage's directory."""
    from rmpl_ds import preflight as checks
    from rmpl_ds.config import load_recipe
    from rmpl_ds.ds_config import recipe_ds_config
    from rmpl_ds.engine import collective_timeout_s

    base = load_recipe(args.recipe, args.overrides)
    gpus = args.gpus or base.launch.gpus
    nodes = _hostfile_nodes(args.hostfile) if args.hostfile else base.launch.nodes
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
    return gpus, scope.run_dir / args.stage


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
    import psutil

    gpus, stage_dir = preflight(args)
    env = dict(
        os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    )
    if args.verbose:
        env[VERBOSE_ENV] = "1"  # the ranks keep the libraries' own output too
    stage_dir.mkdir(parents=True, exist_ok=True)
    log_path = stage_dir / LOG_NAME
    process = subprocess.Popen(launcher_command(args, gpus), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

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
