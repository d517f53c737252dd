"""DeepSpeed's CPU shared-memory all-reduce buffers do not outlive a run (rmpl_ds.engine.init_distributed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from rmpl_ds import engine
name = sys.argv[1]
unlink = engine._unlink_shm_allreduce_buffer
def observed():
    print("created", os.path.exists(name))
    unlink()
engine._unlink_shm_allreduce_buffer = observed
engine.init_distributed(torch.device("cpu"), 60)
print("exists", os.path.exists(name))
t = torch.ones(4)
dist.all_reduce(t)
print("sum", t.tolist())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_rank_buffer_name_is_gone_once_the_process_group_is_up(tmp_path: Path) -> None:
    port = _free_port()
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_SIZE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, name], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "created True" in result.stdout, result.stdout + result.stderr[-2000:]  # DeepSpeed's shm op made it
    assert "exists False" in result.stdout  # and the package removed the name
    assert "sum [1.0, 1.0, 1.0, 1.0]" in result.stdout  # collectives still work
    assert not Path(name).exists()
