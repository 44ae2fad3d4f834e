"""Data-parallel natgrad on ``torch.distributed``: communicator, placement, K-FAC exchange.

Everything here is a no-op without an initialised process group or at world size 1.

Modules: ``comm`` (:class:`Communicator`: bucketed all-reduce and broadcast, byte counts),
``placement`` (which rank computes which inverse), ``kfac`` (what K-FAC exchanges),
``checkpoint`` (checkpoints that load on any world size), ``dcp``
(``torch.distributed.checkpoint``: every rank writes its part, any world size reads it) and
``launch`` (process groups from ``torchrun``'s environment or ``torch.multiprocessing``).
"""

from natgrad.distributed.comm import Communicator, count_ddp_bytes, mean_operator, unwrap_model
from natgrad.distributed.dcp import (
    load_dcp,
    load_optimizer_state_dict,
    optimizer_state_dict,
    optimizer_template,
    save_dcp,
)
from natgrad.distributed.kfac import FactorSync
from natgrad.distributed.placement import (
    PLACEMENTS,
    balanced_placement,
    block_cost,
    block_size,
    owner_placement,
    rank_loads,
    resolve_placement,
)

__all__ = [
    "PLACEMENTS",
    "Communicator",
    "FactorSync",
    "balanced_placement",
    "block_cost",
    "block_size",
    "count_ddp_bytes",
    "load_dcp",
    "load_optimizer_state_dict",
    "mean_operator",
    "optimizer_state_dict",
    "optimizer_template",
    "owner_placement",
    "rank_loads",
    "resolve_placement",
    "save_dcp",
    "unwrap_model",
]
