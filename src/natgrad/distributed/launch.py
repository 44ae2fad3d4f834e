"""Starting data-parallel processes: from ``torchrun``'s environment, or spawned here.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, and
restarts them all when one fails (``--max-restarts``). :func:`spawn` does the same on one
machine without a launcher: it starts ``nproc`` processes with ``torch.multiprocessing``
and the same environment (loopback address, a free port), so a worker function reads its
rank the same way under both. Neither is needed for one process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ENV_KEYS", "free_port", "init_from_env", "launched", "local_rank", "spawn"]

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LOOPBACK = "127.0.0.1"


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or :func:`spawn`): its rank is set."""
    return all(key in os.environ for key in ENV_KEYS)


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago on ``host`` (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_from_env(backend: str) -> None:
    """``init_process_group`` from the launcher's environment (``env://``); for NCCL, first
    bind this process to GPU ``LOCAL_RANK``."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, init_method="env://")


def _entry(index: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
    )
    fn(*args)


def spawn(fn: Callable[..., Any], nproc: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes, each with a ``torchrun``-like environment.

    ``fn`` must be importable (a module-level function) and call :func:`init_from_env`.
    Blocks until all have finished.

    Raises:
        torch.multiprocessing.ProcessRaisedException: if a process raised (the others are
            terminated); ``ProcessExitedException`` if one exited with a non-zero status.
    """
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_entry, args=(fn, nproc, port, args), nprocs=nproc, start_method="spawn")
