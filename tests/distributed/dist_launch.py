"""Start W processes of a script on 127.0.0.1 with a torchrun-like environment (test helper)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 120  # seconds for a whole launch; each should take well under a minute


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a test worker: one thread, natgrad's sources importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def launch(args: Sequence[str], world: int = 2, timeout: float = TIMEOUT, **env: str) -> None:
    """Run ``python ARGS`` as ranks 0…world−1 of one gloo job; raise if any rank fails."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=worker_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode]
    if failed:
        raise AssertionError(f"ranks failed {failed}:\n" + "\n".join(outputs))
