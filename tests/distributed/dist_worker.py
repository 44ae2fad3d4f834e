"""One rank of the distributed K-FAC tests (a script, and a module the tests import).

    python dist_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Run with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (as the tests
and ``torchrun`` do), it joins a process group (gloo on the CPU, or NCCL on GPU ``RANK`` if
``DIST_BACKEND=nccl``), trains each scenario's model under
``DistributedDataParallel`` (or, for the ``fsdp-`` scenarios, sharded with FSDP2's
``fully_shard`` on every Linear and on the model) on its share of every global batch (rank r
takes rows [r·N/W, (r+1)·N/W)) and saves the final (whole) parameters to
``OUT_DIR/{scenario}-w{W}-r{r}.pt``.
Imported by a test (no process group), :func:`run_scenario` trains the same model on the
whole global batch in one process: the reference.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.distributed.checkpoint import load_checkpoint, save_checkpoint
from natgrad.distributed.dcp import load_dcp, save_dcp
from natgrad.distributed.fsdp import is_sharded

DTYPE = torch.float64
GLOBAL_BATCH = 16
STEPS = 8
CHECKPOINT_STEP = 4  # the "ckpt" scenarios save after this many steps
OVERFLOW_STEP = 2  # the overflow scenarios' step whose statistics are not finite


class Scale(nn.Module):
    """An elementwise scale: a parameter natgrad has no block for (the fallback diagonal)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def build_model() -> nn.Module:
    """Linear → Tanh → LayerNorm (dense block) → Linear → Scale (fallback), float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4), Scale(4)
    )
    return model.to(DTYPE)


def build_odd_model() -> nn.Module:
    """build_model with odd widths: FSDP2's dim-0 shards are uneven (4 + 3 rows of 7)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 5), Scale(5)
    )
    return model.to(DTYPE)


def build_tied_model() -> nn.Module:
    """build_model with a weight two Linear layers share (one shared block), float64."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    second.weight = first.weight
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), first, nn.Tanh(), second, nn.Tanh(), nn.LayerNorm(8),
        nn.Linear(8, 4), Scale(4),
    )
    return model.to(DTYPE)


class Recurrent(nn.Module):
    """Each input row [6] read as 3 steps of 2 features by a GRU (hidden 5), a Linear head on
    the last state, and the Scale (fallback): a recurrent layer's blocks across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 4)
        self.scale = Scale(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.head(self.rnn(x.view(x.shape[0], 3, 2))[0][:, -1]))


def build_recurrent_model() -> nn.Module:
    torch.manual_seed(0)
    return Recurrent().to(DTYPE)


def global_batches(steps: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[steps, N, 6]`` and class labels ``[steps, N]`` (4 classes)."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(steps, GLOBAL_BATCH, 6, generator=gen, dtype=DTYPE)
    labels = torch.randint(0, 4, (steps, GLOBAL_BATCH), generator=gen)
    return inputs, labels


FIXED = dict(lr=0.1, damping=0.1, momentum=0.5, kl_clip=1e-2)
AUTO = dict(lm_every=1)  # lr, momentum, damping "auto" (the defaults); LM every step
# statistics every step, inverses every 2 from the first step (no curvature warm-up, whose
# every-step inverses would hide the schedule the traffic tests count)
EMPIRICAL = dict(kind="empirical", stat_every=1, inv_every=2, curvature_warmup=0)


@dataclass(frozen=True)
class Scenario:
    """An optimizer and its settings; ``exact``: compared with one process (deterministic)."""

    optimizer: str
    settings: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    tied: bool = False  # the model with a shared weight
    sharded: bool = False  # FSDP2 (fully_shard) instead of DDP on several ranks
    odd: bool = False  # the model with odd widths (uneven shards)
    kept: bool = False  # FSDP keeps the parameters unsharded after backward
    frozen: bool = False  # the LayerNorm's weight does not train (sharded, not optimized)
    hsdp: bool = False  # HSDP: fully_shard on a (W/2 replicas) × (2 shards) mesh
    recurrent: bool = False  # the GRU model
    # the last example of the global batch at step OVERFLOW_STEP (the last rank's) scaled by
    # 1e200: its Σ āāᵀ overflows on that rank alone (tanh saturates: gradients stay finite)
    overflow: bool = False


SCENARIOS = {
    "kfac-empirical-fixed": Scenario("KFAC", {**EMPIRICAL, **FIXED}),
    "kfac-empirical-fixed-everywhere": Scenario(
        "KFAC", {**EMPIRICAL, **FIXED, "inverse_placement": "everywhere"}
    ),
    "kfac-empirical-fixed-owner": Scenario(  # state on owners, KL clipping's sum over them
        "KFAC", {**EMPIRICAL, **FIXED, "inverse_placement": "owner"}
    ),
    "ekfac-empirical-fixed": Scenario("EKFAC", {**EMPIRICAL, **FIXED}),
    "kfac-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO}),
    "ekfac-empirical-auto": Scenario("EKFAC", {**EMPIRICAL, **AUTO}),
    # inverses every 3 steps: a run resumed at step CHECKPOINT_STEP starts on a statistics
    # step without a refresh
    "ekfac-empirical-auto-inv3": Scenario("EKFAC", {**EMPIRICAL, **AUTO, "inv_every": 3}),
    "ngdcg-empirical-auto": Scenario("NGDCG", {**EMPIRICAL}),
    "kfac-tied-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO}, tied=True),
    "kfac-gru-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO}, recurrent=True),
    # "owner": the statistics reduced to the owners, a shared weight's uses to its block's
    "kfac-tied-empirical-auto-owner": Scenario(
        "KFAC", {**EMPIRICAL, **AUTO, "inverse_placement": "owner"}, tied=True),
    # "owner": a block's overflowing sums are seen by its owner only; every rank skips
    "kfac-overflow-empirical-auto-owner": Scenario(
        "KFAC", {**EMPIRICAL, **AUTO, "inverse_placement": "owner"}, overflow=True),
    "kfac-true-auto": Scenario("KFAC", {"stat_every": 1, "inv_every": 2, "mc_samples": 2},
                               exact=False),
    "ekfac-true-fixed-everywhere": Scenario(
        "EKFAC", {"stat_every": 1, "inv_every": 3, **FIXED, "inverse_placement": "everywhere"},
        exact=False,
    ),
}
CHECKPOINTED = "kfac-empirical-auto"  # the scenario of the checkpoint tests

# FSDP2: each mirrors the DDP scenario of the same name without the prefix
FSDP_SCENARIOS = {
    f"fsdp-{name}": Scenario(SCENARIOS[name].optimizer, SCENARIOS[name].settings,
                             SCENARIOS[name].exact, sharded=True)
    for name in ("kfac-empirical-fixed", "kfac-empirical-auto", "ekfac-empirical-auto",
                 "ngdcg-empirical-auto", "kfac-true-auto")
}
OWNER = {"inverse_placement": "owner"}  # the default under FSDP2 ("auto"), made explicit
FSDP_SCENARIOS.update({
    "fsdp-ekfac-empirical-auto-inv3": Scenario(
        "EKFAC", SCENARIOS["ekfac-empirical-auto-inv3"].settings, sharded=True),
    "fsdp-kfac-balanced-empirical-auto": Scenario(
        "KFAC", {**EMPIRICAL, **AUTO, "inverse_placement": "balanced"}, sharded=True),
    "fsdp-odd-kfac-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO}, sharded=True,
                                             odd=True),
    "fsdp-kfac-owner-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO, **OWNER},
                                               sharded=True),
    "fsdp-kept-kfac-empirical-auto": Scenario("KFAC", {**EMPIRICAL, **AUTO}, sharded=True,
                                              kept=True),
    "fsdp-frozen-ngdcg-empirical-auto": Scenario("NGDCG", EMPIRICAL, sharded=True,
                                                 frozen=True),
    "fsdp-kfac-owner-true-auto": Scenario("KFAC", {**SCENARIOS["kfac-true-auto"].settings,
                                                   **OWNER}, exact=False, sharded=True),
})
# HSDP on 4 ranks: shards within pairs of ranks, replicated over the pairs
FSDP_SCENARIOS.update({
    f"hsdp-{name}": Scenario(SCENARIOS[name].optimizer, SCENARIOS[name].settings, sharded=True,
                             hsdp=True)
    for name in ("kfac-empirical-auto", "ekfac-empirical-auto")
})
FSDP_CHECKPOINTED = "fsdp-kfac-owner-empirical-auto"


def shard_model(model: nn.Module, kept: bool = False, mesh: Any = None) -> nn.Module:
    """FSDP2 on every Linear and on the model (LayerNorm and Scale in the root's group);
    ``kept``: the parameters stay unsharded after backward (resharded at the next forward);
    ``mesh``: a 2-D device mesh for HSDP (default: FSDP2 over all ranks)."""
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    if kept:
        model.set_reshard_after_backward(False)
    return model


def whole_params(model: nn.Module) -> list[Tensor]:
    """The model's parameters as whole tensors on the CPU (all-gathered if sharded)."""
    return [(p.full_tensor() if is_sharded(p) else p).detach().cpu().clone()
            for p in model.parameters()]


def shard(world: int, rank: int) -> slice:
    """This rank's rows of a global batch."""
    size = GLOBAL_BATCH // world
    return slice(rank * size, (rank + 1) * size)


def flat(params: list[Tensor]) -> Tensor:
    """The parameters of a result as one vector."""
    return torch.cat([p.reshape(-1) for p in params])


def one_process(name: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_scenario` in this process on one thread (the reference runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice
        result = run_scenario(name, **kwargs)
    torch.set_num_threads(threads)
    return result


def run_scenario(
    name: str,
    steps: int = STEPS,
    world: int = 1,
    rank: int = 0,
    resume: Path | None = None,
    save_at: tuple[int, Path] | None = None,
    device: torch.device | None = None,
    whole_checkpoint: bool = False,
    dcp: bool = False,
) -> dict[str, Any]:
    """Train scenario ``name`` for ``steps`` steps on this rank's shard.

    Args:
        device: where to train (default: the CPU).
        resume: a checkpoint (model and optimizer state) to start from, a file or a DCP
            folder (:func:`natgrad.distributed.dcp.save_dcp`); its step count says which
            global batch comes next.
        save_at: (step, path): rank 0 saves a checkpoint after that many steps (sharded:
            every rank its own, to its own path).
        whole_checkpoint: save with :func:`natgrad.distributed.checkpoint.save_checkpoint`
            (collective; a sharded model saved whole).
        dcp: save with :func:`natgrad.distributed.dcp.save_dcp` (collective; a folder).

    Returns:
        ``params`` (final parameters), ``seed`` (the label generator's seed), ``bytes`` and
        ``calls`` (natgrad's own communication), ``rng`` (the label generator's state),
        ``block_bytes`` (the blocks' tensors this rank holds at the end) and
        ``loaded_block_bytes`` (those it read from a DCP checkpoint; None otherwise),
        ``cached_bytes`` (EKFAC's eigenbases of other ranks' blocks), ``placement``,
        ``draws`` (the first label draw of the true Fisher: outputs and labels),
        ``momentum_bytes`` (the momentum δ₀ this rank holds at the end; under FSDP2 its
        rows), ``loaded_momentum_bytes`` (that just after loading a checkpoint; None
        without one), ``momentum_steps`` (the steps that began with a δ₀) and ``skipped``
        (the steps skipped for non-finite values).
    """
    device = device or torch.device("cpu")
    scenario = {**SCENARIOS, **FSDP_SCENARIOS}[name]
    build = (build_tied_model if scenario.tied else build_odd_model if scenario.odd
             else build_recurrent_model if scenario.recurrent else build_model)
    model = build().to(device)
    if scenario.frozen:
        model[2].weight.requires_grad_(False)
    start = 0
    sharded = world > 1 and scenario.sharded
    dcp_resume = resume is not None and resume.is_dir()  # a torch.distributed.checkpoint
    if resume is not None and not dcp_resume:
        checkpoint = torch.load(resume, weights_only=False, map_location=device)
        if not sharded:
            model.load_state_dict(checkpoint["model"])
        start = checkpoint["step"]
    wrapped = model
    if sharded:
        mesh = None
        if scenario.hsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (world // 2, 2),
                                    mesh_dim_names=("replicate", "shard"))
        wrapped = model = shard_model(model, scenario.kept, mesh)
    elif world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = getattr(natgrad, scenario.optimizer)(
        wrapped, likelihood="categorical", **scenario.settings
    )
    loaded = None
    if dcp_resume:
        loaded = loaded_block_bytes(resume, optimizer)
        start = load_dcp(resume, model, optimizer)["step"]
    elif sharded and resume is not None:
        if any(is_sharded(v) for v in checkpoint["model"].values()):  # this rank's shards
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:  # whole tensors: each rank takes its shards
            load_checkpoint(resume, optimizer.communicator, model, optimizer)
    elif resume is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    loaded_momentum = None if resume is None else momentum_bytes(optimizer)
    momentum_steps = 0
    draws = record_draws(optimizer)
    inputs, labels = global_batches(start + steps)
    if scenario.overflow and start <= OVERFLOW_STEP < start + steps:
        inputs[OVERFLOW_STEP, -1] *= 1e200
    inputs, labels = inputs.to(device), labels.to(device)
    rows = shard(world, rank)
    for step in range(start, start + steps):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(inputs[step, rows]), labels[step, rows]).backward()
        momentum_steps += any("previous_update" in entry for entry in optimizer.state.values())
        optimizer.step()
        if save_at is not None and step + 1 == save_at[0] and dcp:
            save_dcp(save_at[1], model, optimizer, step=step + 1)
        elif save_at is not None and step + 1 == save_at[0] and whole_checkpoint:
            save_checkpoint(save_at[1], optimizer.communicator, model, optimizer, step=step + 1)
        elif save_at is not None and step + 1 == save_at[0] and (rank == 0 or sharded):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step + 1}
            torch.save(state, save_at[1])
    comm = optimizer.communicator
    return {
        "params": whole_params(model),
        "seed": optimizer._generator.initial_seed(),
        "rng": optimizer._generator.get_state(),
        "bytes": comm.bytes,
        "calls": comm.calls,
        "state": {k: v for k, v in optimizer.global_state.items() if isinstance(v, float)},
        "block_bytes": block_bytes(optimizer),
        "loaded_block_bytes": loaded,
        "cached_bytes": cached_bytes(optimizer),
        "placement": getattr(optimizer_sync(optimizer), "placement", None),
        "draws": draws[:1],
        "momentum_bytes": momentum_bytes(optimizer),
        "loaded_momentum_bytes": loaded_momentum,
        "momentum_steps": momentum_steps,
        "skipped": optimizer.global_state["skipped_steps"],
    }


def record_draws(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor]]:
    """(outputs, labels) of every label draw of the true Fisher, in order (a list that the
    optimizer's likelihood appends to)."""
    likelihood = optimizer.loss_spec.likelihood
    draw, draws = likelihood.sample, []

    def sample(outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        labels = draw(outputs, generator)
        draws.append((outputs.detach().cpu().clone(), labels.cpu().clone()))
        return labels

    likelihood.sample = sample  # this optimizer's own likelihood object
    return draws


def dcp_folder(out: Path, scenario: str, world: int) -> Path:
    """Where ``dcp-save-SCENARIO`` on ``world`` ranks puts its DCP checkpoint."""
    return out / f"dcp-{scenario}-w{world}"


def loaded_block_bytes(folder: Path, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the block tensors this rank reads from a DCP checkpoint (its template)."""
    import torch.distributed.checkpoint as dcp

    from natgrad.distributed.dcp import optimizer_template
    from natgrad.distributed.kfac import BLOCK_KEYS

    template = optimizer_template(optimizer, dcp.FileSystemReader(folder).read_metadata())
    return sum(v.numel() * v.element_size() for k, v in template.items()
               if isinstance(v, Tensor) and k.split("/")[-1].split(".")[0] in BLOCK_KEYS)


def optimizer_sync(optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer's K-FAC exchange (None for optimizers without Kronecker blocks)."""
    from natgrad.distributed.kfac import kronecker_preconditioner

    preconditioner = kronecker_preconditioner(optimizer)
    return None if preconditioner is None else preconditioner.sync


def cached_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the eigenbases this rank caches for blocks that other ranks own (EKFAC)."""
    sync = optimizer_sync(optimizer)
    return 0 if sync is None else sync.cached_bytes()


def momentum_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the momentum δ₀ this rank holds (a sharded one's local rows only)."""
    total = 0
    for entry in optimizer.state.values():
        value = entry.get("previous_update")
        if isinstance(value, Tensor):
            local = value.to_local() if is_sharded(value) else value
            total += local.numel() * local.element_size()
    return total


def block_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the blocks' factors and inverses this rank holds."""
    from natgrad.distributed.kfac import BLOCK_KEYS

    return sum(value.numel() * value.element_size() for entry in optimizer.state.values()
               for key, value in entry.items()
               if isinstance(value, Tensor) and key.split(".")[0] in BLOCK_KEYS)


def check_fsdp_errors() -> dict[str, str]:
    """What the optimizers say about sharded models they do not support (message by case)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    messages = {}
    cases = {
        "NaturalGradient": lambda: natgrad.NaturalGradient(shard_model(build_model())),
        "dim1": lambda: natgrad.KFAC(  # matrices sharded on dim 1
            fully_shard(build_model(),
                        shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0)),
        ),
    }
    for case, make in cases.items():
        try:
            make()
        except (TypeError, ValueError) as error:
            messages[case] = f"{type(error).__name__}: {error}"
    return messages


def check_communicator(device: torch.device) -> dict[str, Any]:
    """The communicator's collectives on made-up tensors: results and counts per call."""
    from natgrad.distributed import Communicator

    comm = Communicator()
    rank = comm.rank
    floats = [torch.full((2, 3), rank + 1.0, dtype=DTYPE, device=device),
              torch.arange(4, dtype=DTYPE, device=device) * (rank + 1)]
    singles = [torch.full((5,), rank + 0.5, dtype=torch.float32, device=device)]
    comm.all_reduce(floats + singles)  # two dtypes: two calls
    after_reduce = (comm.calls, comm.bytes)
    shared = [torch.full((3,), float(rank), device=device), torch.full((2, 2), 10.0 + rank,
                                                                        device=device)]
    comm.broadcast(shared, src=1)
    gathered = comm.all_gather(torch.tensor([rank, 7 * rank], device=device))
    summed = [torch.full((2,), rank + 1.0, dtype=DTYPE, device=device),
              torch.full((3,), rank + 1.0, device=device)]
    before = (comm.calls, comm.bytes)
    comm.reduce(summed, dst=1)
    reduce_counts = (comm.calls - before[0], comm.bytes - before[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        natgrad.NaturalGradient(build_model().to(device), lr=0.1, damping=0.1)
    return {
        "ngd_warning": [str(w.message) for w in caught],
        "all_reduce": [t.cpu() for t in floats + singles],
        "after_reduce": after_reduce,
        "broadcast": [t.cpu() for t in shared],
        "sum_values": comm.sum_values([rank, 2.5]),
        "all_gather": [t.cpu() for t in gathered],
        "reduce": [t.cpu() for t in summed],
        "reduce_counts": reduce_counts,
        "calls": comm.calls,
        "bytes": comm.bytes,
    }


def main(argv: list[str]) -> None:
    """Run every scenario of ``argv[1:]`` on this rank; results to ``argv[0]``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(argv[0])
    backend = os.environ.get("DIST_BACKEND", "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://")
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        for name in argv[1:]:
            if name == "comm":
                result = check_communicator(device)
            elif name == "checkpoint":  # save after CHECKPOINT_STEP steps, keep going
                path = out / f"checkpoint-w{world}.pt"
                result = run_scenario(CHECKPOINTED, world=world, rank=rank,
                                      save_at=(CHECKPOINT_STEP, path), device=device)
            elif name == "fsdp-errors":
                result = check_fsdp_errors()
            elif name == "fsdp-checkpoint":  # every rank saves its shards, keeps going
                path = out / f"fsdp-state-w{world}-r{rank}.pt"
                result = run_scenario(FSDP_CHECKPOINTED, world=world, rank=rank,
                                      save_at=(CHECKPOINT_STEP, path), device=device)
            elif name == "fsdp-save":  # saved whole by natgrad's checkpoint (any world size)
                result = run_scenario(FSDP_CHECKPOINTED, world=world, rank=rank, device=device,
                                      save_at=(CHECKPOINT_STEP, out / "fsdp-whole.pt"),
                                      whole_checkpoint=True)
            elif name == "fsdp-resume-w1":  # a one-process checkpoint continued sharded
                result = run_scenario(FSDP_CHECKPOINTED, STEPS - CHECKPOINT_STEP, world, rank,
                                      resume=out / "checkpoint-w1.pt", device=device)
            elif name == "fsdp-resume":  # continue from those shards
                result = run_scenario(FSDP_CHECKPOINTED, STEPS - CHECKPOINT_STEP, world, rank,
                                      resume=out / f"fsdp-state-w{world}-r{rank}.pt",
                                      device=device)
            elif name.startswith("dcp-save-"):  # DCP after CHECKPOINT_STEP steps, keep going
                scenario = name.removeprefix("dcp-save-")
                result = run_scenario(scenario, world=world, rank=rank, device=device, dcp=True,
                                      save_at=(CHECKPOINT_STEP, dcp_folder(out, scenario, world)))
            elif name.startswith("dcp-resume-w"):  # dcp-resume-wK-SCENARIO: K ranks saved it
                saved, scenario = name.removeprefix("dcp-resume-w").split("-", 1)
                # dcp-resume-wK-SAVED@SCENARIO: SAVED's checkpoint continued as SCENARIO
                source, _, scenario = scenario.rpartition("@") if "@" in scenario \
                    else (scenario, "", scenario)
                result = run_scenario(scenario, STEPS - CHECKPOINT_STEP, world, rank,
                                      resume=dcp_folder(out, source, int(saved)),
                                      device=device)
            elif name == "resume":  # continue a one-process run's checkpoint on W ranks
                result = run_scenario(CHECKPOINTED, STEPS - CHECKPOINT_STEP, world, rank,
                                      resume=out / "checkpoint-w1.pt", device=device)
            else:
                result = run_scenario(name, world=world, rank=rank, device=device)
            torch.save(result, out / f"{name}-w{world}-r{rank}.pt")
        dist.barrier()  # nobody leaves while a peer still uses the connections (gloo aborts)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
