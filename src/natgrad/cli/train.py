"""``natgrad train``: train one benchmark problem, on one process or data-parallel on several.

One problem of ``natgrad bench`` (its data, model and loss) with one optimizer of its
registry (with the tuned hyper-parameters), for a number of steps at a fixed *global* batch.
With ``--nproc N`` it starts N processes on this machine (``torch.multiprocessing``, gloo on
127.0.0.1 for the CPU, NCCL for ``--device cuda``); under ``torchrun`` it joins the job that
``torchrun`` started, on one machine or several. Each of the W processes wraps the model in
``DistributedDataParallel`` and takes 1/W of every global batch; natgrad's optimizers
exchange their statistics (see :mod:`natgrad.distributed`).

``--checkpoint PATH`` saves the run every ``--checkpoint-every`` steps and at the end, and
resumes from PATH when it exists (on any number of processes): with ``torchrun
--max-restarts`` a run whose worker dies restarts from its last checkpoint and ends with the
parameters an uninterrupted run would have.

Output (rank 0): a table (steps, final training loss, median step time, bytes communicated
per step by natgrad and by DDP) and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from natgrad.bench import OPTIMIZERS, PROBLEMS
from natgrad.bench.runner import _sync
from natgrad.cli.args import positive_int, seed
from natgrad.distributed import launch

__all__ = ["TrainConfig", "add_parser", "execute", "run", "train"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DATA_PARALLEL = ("KFAC", "EKFAC", "NGDCG", None)  # natgrad classes (None: torch's) that support it
NATGRAD_PLACEMENT = ("KFAC", "EKFAC", "NGDCG")


@dataclass(frozen=True)
class TrainConfig:
    """One ``natgrad train`` run (built from the command line).

    Attributes:
        problem: a problem of ``natgrad.bench.PROBLEMS``.
        optimizer: an optimizer of ``natgrad.bench.OPTIMIZERS``.
        steps: optimizer steps (None: the problem's budget).
        batch_size: the global batch, split evenly over the processes (None: the problem's).
        nproc: processes to start on this machine (ignored under ``torchrun``).
        seed: seeds the split, the initial weights and the minibatch order.
        device: ``"cpu"`` or ``"cuda"`` (one GPU per process).
        dtype: ``"float32"`` or ``"float64"``.
        backend: ``"gloo"`` or ``"nccl"`` (None: NCCL on CUDA, else gloo).
        threads: ``torch.set_num_threads`` in each process.
        checkpoint: checkpoint file (saved, and resumed from if it exists).
        checkpoint_every: steps between checkpoints.
        inverse_placement: ``"auto"`` (``"owner"`` with ``fsdp``, else ``"balanced"``),
            ``"balanced"``, ``"everywhere"`` or ``"owner"`` (natgrad's K-FAC optimizers).
        tuned: a tuned-values file instead of the one shipped with natgrad.
        fsdp: shard the model with FSDP2 (``fully_shard``) instead of wrapping it in DDP.
    """

    problem: str = "digits-autoencoder"
    optimizer: str = "kfac"
    steps: int | None = None
    batch_size: int | None = None
    nproc: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    backend: str | None = None
    threads: int = 1
    checkpoint: Path | None = None
    checkpoint_every: int = 50
    inverse_placement: str = "auto"
    tuned: Path | None = None
    fsdp: bool = False

    @property
    def world_size(self) -> int:
        """Processes of the run: ``WORLD_SIZE`` under ``torchrun``, else ``nproc``."""
        return int(os.environ["WORLD_SIZE"]) if launch.launched() else self.nproc

    @property
    def backend_name(self) -> str:
        """The process group's backend."""
        return self.backend or ("nccl" if self.device == "cuda" else "gloo")

    def global_batch(self) -> int:
        """Examples per step, over all processes."""
        return self.batch_size or PROBLEMS[self.problem].batch_size

    def total_steps(self) -> int:
        """The step budget."""
        return self.steps or PROBLEMS[self.problem].steps

    def validate(self) -> None:
        """Raise ValueError naming the setting if the run cannot go ahead as configured."""
        from natgrad.bench.optimizers import load_tuned

        spec = OPTIMIZERS[self.optimizer]
        if not spec.available:
            raise ValueError(f"optimizer {self.optimizer!r} is not in this natgrad install")
        world = self.world_size
        if world > 1 and spec.natgrad_name not in DATA_PARALLEL:
            raise ValueError(f"optimizer {self.optimizer!r} does not support data parallelism; "
                             f"use one of the K-FAC family or a torch optimizer")
        if self.fsdp and world < 2:
            raise ValueError("--fsdp shards the model over processes: give --nproc 2 or more, "
                             "or run under torchrun")
        if self.global_batch() % world:
            raise ValueError(f"the global batch size {self.global_batch()} must be divisible "
                             f"by the number of processes {world}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if self.backend_name == "nccl" and self.device != "cuda":
            raise ValueError("backend 'nccl' needs --device cuda")
        if self.tuned is not None:
            load_tuned(self.tuned)
        if self.checkpoint is not None and self.checkpoint.exists():
            from natgrad.distributed.checkpoint import read_checkpoint

            saved = read_checkpoint(self.checkpoint).get("config", {})
            for key in ("problem", "optimizer", "seed", "dtype"):
                if key in saved and saved[key] != getattr(self, key):
                    raise ValueError(f"checkpoint {self.checkpoint} was written with {key} "
                                     f"{saved[key]!r}, not {getattr(self, key)!r}")


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train on this process: one rank of the process group if there is one, else alone.

    Args:
        config: the run.
        on_step: called with the number of steps done after each step (and checkpoint).

    Returns:
        The run's summary (the JSON line's fields).
    """
    from torch.nn.parallel import DistributedDataParallel

    from natgrad.bench.data import batch_indices
    from natgrad.bench.optimizers import load_tuned
    from natgrad.distributed import Communicator, count_ddp_bytes
    from natgrad.distributed.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(config.threads)
    comm = Communicator()
    rank, world = comm.rank, comm.world_size
    device = torch.device("cuda", launch.local_rank()) if config.device == "cuda" else (
        torch.device("cpu"))
    problem, spec = PROBLEMS[config.problem], OPTIMIZERS[config.optimizer]
    dataset = problem.load(config.seed).to(device, DTYPES[config.dtype])
    x_train, y_train = dataset.x_train, dataset.y_train
    hparams = spec.hparams(problem.name, load_tuned(config.tuned))
    if spec.natgrad_name in NATGRAD_PLACEMENT:
        hparams["inverse_placement"] = config.inverse_placement
    torch.manual_seed(config.seed)
    model = problem.build_model().to(device=device, dtype=dataset.float_dtype)
    wrapped = model
    ddp_bytes = None
    if comm.active and config.fsdp:
        _fully_shard(model)
    elif comm.active:
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        ddp_bytes = count_ddp_bytes(wrapped)
    optimizer = spec.build(wrapped, problem.loss, hparams)
    natgrad_comm = getattr(optimizer, "communicator", None)
    start = 0
    if config.checkpoint is not None and config.checkpoint.exists():
        start = load_checkpoint(config.checkpoint, comm, model, optimizer)["step"]

    steps, batch = config.total_steps(), config.global_batch()
    indices = batch_indices(dataset.num_train, batch, steps, config.seed).to(device)
    share = batch // world
    rows = slice(rank * share, (rank + 1) * share)
    saved = {key: getattr(config, key) for key in ("problem", "optimizer", "seed", "dtype")}
    sent_before = natgrad_comm.bytes if natgrad_comm is not None else 0
    times: list[float] = []
    for step in range(start, steps):
        batch_rows = indices[step, rows]
        x = x_train[batch_rows]
        y = x if y_train is x_train else y_train[batch_rows]
        _sync(device)
        begin = time.perf_counter()
        optimizer.zero_grad()
        problem.compute_loss(wrapped(x), y).backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - begin)
        done = step + 1
        if config.checkpoint is not None and (
            done % config.checkpoint_every == 0 or done == steps
        ):
            save_checkpoint(config.checkpoint, comm, model, optimizer, step=done, config=saved)
        if on_step is not None:
            on_step(done)
    ran = max(len(times), 1)
    natgrad_sent = (natgrad_comm.bytes - sent_before) if natgrad_comm is not None else 0
    return {
        "problem": problem.name,
        "optimizer": spec.name,
        "processes": world,
        "sharding": "fsdp" if config.fsdp and comm.active else ("ddp" if comm.active else None),
        "backend": config.backend_name if world > 1 else None,
        "global_batch": batch,
        "steps": steps,
        "start_step": start,
        "final_train_loss": problem.dataset_loss(model, x_train, y_train),
        "median_step_seconds": statistics.median(times) if times else math.nan,
        "mean_step_seconds": statistics.fmean(times) if times else math.nan,
        "natgrad_bytes_per_step": natgrad_sent / ran,
        "ddp_bytes_per_step": (ddp_bytes.bytes / ran) if ddp_bytes is not None else 0.0,
        "checkpoint": None if config.checkpoint is None else str(config.checkpoint),
    }


def _fully_shard(model: torch.nn.Module) -> None:
    """FSDP2: one unit per layer whose parameters no other module uses, then the root (which
    takes the rest, tied weights included)."""
    from torch.distributed.fsdp import fully_shard

    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for module in list(model.modules())[1:]:
        own = list(module.parameters(recurse=False))
        if own and not list(module.children()) and all(owners[id(p)] == 1 for p in own):
            fully_shard(module)
    fully_shard(model)


def format_result(result: dict[str, Any]) -> str:
    """The run as a small table."""
    backend = f" ({result['backend']})" if result["backend"] else ""
    head = (f"natgrad train: {result['problem']}, {result['optimizer']}, "
            f"{result['processes']} process(es){backend}, global batch {result['global_batch']}")
    if result.get("sharding") == "fsdp":
        head += ", FSDP2"
    if result["start_step"]:
        head += f", resumed at step {result['start_step']}"
    columns = ("steps", "final train loss", "median step ms", "mean step ms",
               "natgrad bytes/step", "DDP bytes/step")
    values = (
        str(result["steps"]),
        f"{result['final_train_loss']:.6g}",
        f"{1e3 * result['median_step_seconds']:.2f}",
        f"{1e3 * result['mean_step_seconds']:.2f}",
        f"{result['natgrad_bytes_per_step']:,.0f}",
        f"{result['ddp_bytes_per_step']:,.0f}",
    )
    widths = [max(len(c), len(v)) for c, v in zip(columns, values, strict=True)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    row = "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
    return "\n".join([head, line, row])


def _report(result: dict[str, Any]) -> None:
    print(format_result(result))
    print()
    print(json.dumps(result))
    sys.stdout.flush()


def _rank_main(
    config: TrainConfig, on_step: Callable[[int], None] | None, results: Any = None
) -> None:
    """One launched process: join the group, train, report (rank 0), leave the group."""
    import torch.distributed as dist

    launch.init_from_env(config.backend_name)
    try:
        result = train(config, on_step)
        if dist.get_rank() == 0:
            if results is None:
                _report(result)
            else:
                results.put(result)
        # no rank tears its connections down while another still talks on them (gloo then
        # aborts the late one: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def execute(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> int:
    """Run ``config`` as launched: a ``torchrun`` rank, ``nproc`` spawned ranks, or alone.

    Returns:
        The exit status.
    """
    if launch.launched():
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if restarts and shared and os.environ.get("RANK") == "0":
            print("natgrad train: warning: torchrun shares its rendezvous store with the "
                  "workers, so restarted workers may read the failed attempt's addresses "
                  "(pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for "
                  "torchrun", file=sys.stderr)
        _rank_main(config, on_step)
        return 0
    if config.nproc == 1:
        _report(train(config, on_step))
        return 0
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    try:
        launch.spawn(_rank_main, config.nproc, (config, on_step, results))
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        print(f"natgrad train: a worker failed: {err}", file=sys.stderr)
        return 1
    _report(results.get())
    return 0


# --- command line -----------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``natgrad`` parser's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train one problem, data-parallel with --nproc N or under torchrun",
        description=__doc__,
        epilog="launch on several machines: torchrun --nnodes=M --nproc-per-node=N "
        "--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT -m natgrad.cli train ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--problem", choices=list(PROBLEMS), default="digits-autoencoder",
                        help="the problem (default: %(default)s)")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="kfac",
                        help="the optimizer, with its tuned values (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="optimizer steps (default: the problem's budget)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="global batch, split evenly over the processes (default: the "
                        "problem's)")
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                        help="processes to start on this machine (default: %(default)s; "
                        "under torchrun leave it out: torchrun starts them)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seeds the split, initial weights and minibatches (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda with one GPU per process (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="floating-point type of model and data (default: %(default)s)")
    parser.add_argument("--backend", choices=("gloo", "nccl"),
                        help="torch.distributed backend (default: nccl on cuda, else gloo)")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="torch threads per process (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="save to PATH every --checkpoint-every steps and at the end; "
                        "resume from PATH if it exists")
    parser.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="K",
                        help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--inverse-placement",
                        choices=("auto", "balanced", "everywhere", "owner"), default="auto",
                        help="K-FAC inverses: one rank each, balanced by cost, then broadcast; "
                        "every rank computes all; or each block's state lives on its owner "
                        "only; auto: owner with --fsdp, else balanced (default: %(default)s)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard the model with FSDP2 (fully_shard: one unit per untied "
                        "layer, then the root) instead of wrapping it in DDP; needs 2 or more "
                        "processes")
    parser.add_argument("--tuned", type=Path, metavar="FILE",
                        help="hyper-parameters from FILE instead of natgrad's tuned.json")
    parser.set_defaults(handler=run, subparser=parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` described by parsed ``natgrad train`` arguments."""
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{key: value for key, value in vars(args).items() if key in fields})


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Run ``natgrad train`` with parsed arguments; the exit status."""
    config = config_from_args(args)
    if launch.launched() and config.nproc not in (1, config.world_size):
        parser.error(f"--nproc {config.nproc} under torchrun, which started "
                     f"{config.world_size} processes; leave --nproc out")
    try:
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    return execute(config, on_step)
