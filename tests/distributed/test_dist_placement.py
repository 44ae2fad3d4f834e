"""Inverse placement: cost Σ d³ per block, balanced over ranks (made-up layer sizes)."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

import natgrad
from natgrad.distributed import (
    FactorSync,
    balanced_placement,
    block_cost,
    rank_loads,
    resolve_placement,
)
from natgrad.distributed.comm import Communicator
from natgrad.distributed.kfac import kronecker_preconditioner, statistic_shapes
from natgrad.distributed.placement import block_size, owner_placement
from natgrad.layers.capture import find_layers

# (d_in, d_out) of made-up Linear layers with bias: one big layer, a few medium, many small
LAYERS = [(1025, 1024), (513, 512), (513, 512), (257, 256), (2049, 10), (129, 64)] + [
    (65, 32)
] * 10


def _costs() -> list[float]:
    return [block_cost([(d_in, d_in), (d_out, d_out)]) for d_in, d_out in LAYERS]


def _best_makespan(costs: list[float], world: int) -> float:
    """The optimal largest load, by trying every placement (small cases only)."""
    return min(
        max(rank_loads(costs, owners, world))
        for owners in itertools.product(range(world), repeat=len(costs))
    )


def test_block_cost_is_sum_of_cubes() -> None:
    assert block_cost([(65, 65), (32, 32)]) == 65**3 + 32**3
    assert block_cost([(1000,), (8, 8)]) == 1000 + 8**3  # a diagonal factor costs d


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_every_block_placed_once_and_deterministic(world: int) -> None:
    costs = _costs()
    owners = balanced_placement(costs, world)
    assert len(owners) == len(costs) and all(0 <= r < world for r in owners)
    assert owners == balanced_placement(costs, world)  # every rank computes the same
    assert sum(rank_loads(costs, owners, world)) == pytest.approx(sum(costs))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_within_graham_bound_of_optimum(world: int) -> None:
    # 9 blocks: every placement can be enumerated (world⁹ ≤ 262,144)
    costs = _costs()[:9]
    largest = max(rank_loads(costs, balanced_placement(costs, world), world))
    best = _best_makespan(costs, world)
    assert largest <= (4 / 3 - 1 / (3 * world)) * best + 1e-9


def test_balances_cost_not_count() -> None:
    # the 1024-wide layer costs more than all the others together: it gets a rank alone
    costs = _costs()
    owners = balanced_placement(costs, 2)
    big = costs.index(max(costs))
    assert [i for i, r in enumerate(owners) if r == owners[big]] == [big]
    # with many equal blocks, loads differ by at most one block's cost
    equal = [5.0] * 10
    loads = rank_loads(equal, balanced_placement(equal, 4), 4)
    assert max(loads) - min(loads) <= 5.0
    # round-robin by count would be far worse than the cost rule on the made-up layers
    round_robin = max(rank_loads(costs, [i % 4 for i in range(len(costs))], 4))
    assert max(rank_loads(costs, balanced_placement(costs, 4), 4)) < round_robin


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        balanced_placement([1.0], 0)
    with pytest.raises(ValueError, match="costs"):
        balanced_placement([-1.0], 2)
    with pytest.raises(ValueError, match="placement"):
        FactorSync(Communicator(), "somewhere")
    with pytest.raises(ValueError, match="placement"):  # the optimizer resolves "auto" first
        FactorSync(Communicator(), "auto")


def test_owner_placement_spreads_memory_as_well_as_cost() -> None:
    # one expensive small block and three cheap large ones: LPT puts the three large ones
    # together (memory 9 of 10 on one rank); balancing both leaves at most 6 of 10 and 11 of
    # 13 of the cost (LPT: 10 of 13)
    costs, sizes = [10.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 3.0]
    balanced = balanced_placement(costs, 2)
    owners = owner_placement(costs, sizes, 2)
    assert max(rank_loads(sizes, balanced, 2)) == 9.0
    assert max(rank_loads(sizes, owners, 2)) == 6.0
    assert max(rank_loads(costs, owners, 2)) == 11.0


@pytest.mark.parametrize("world", [2, 3, 4])
def test_owner_placement_is_lpt_when_memory_follows_cost(world: int) -> None:
    # sizes proportional to costs: both criteria agree, and the owners are LPT's
    costs = _costs()
    assert owner_placement(costs, [2.5 * c for c in costs], world) == \
        balanced_placement(costs, world)


def test_block_size_counts_the_factors_numbers() -> None:
    assert block_size([(65, 65), (32, 32)]) == 65 * 65 + 32 * 32
    assert block_size([(11,), (4, 4)]) == 11 + 16  # a diagonal input factor
    assert block_size([(2, 9, 9), (2, 5, 5)]) == 2 * 81 + 2 * 25  # grouped convolution


def test_owner_placement_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        owner_placement([1.0], [1.0], 0)
    with pytest.raises(ValueError, match="same length"):
        owner_placement([1.0, 2.0], [1.0], 2)
    with pytest.raises(ValueError, match="sizes"):
        owner_placement([1.0], [-1.0], 2)


def test_auto_placement_is_owner_for_sharded_models_only() -> None:
    assert resolve_placement("auto", sharded=True) == "owner"
    assert resolve_placement("auto", sharded=False) == "balanced"
    for placement in ("balanced", "everywhere", "owner"):  # explicit choices stand
        assert resolve_placement(placement, sharded=True) == placement
        assert resolve_placement(placement, sharded=False) == placement


def test_optimizers_default_to_auto_placement() -> None:
    # on one process "auto" is "balanced" (and nothing is exchanged)
    model = nn.Sequential(nn.Linear(3, 2))
    for optimizer in (natgrad.KFAC, natgrad.EKFAC, natgrad.NGDCG):
        sync = kronecker_preconditioner(optimizer(model, likelihood="gaussian")).sync
        assert sync.placement == "balanced"


def test_statistic_shapes_of_layers() -> None:
    model = nn.Sequential(
        nn.Embedding(11, 4), nn.Linear(4, 3), nn.LayerNorm(3), nn.Conv2d(2, 5, 3, bias=False)
    )
    shapes = {n: statistic_shapes(h) for n, h in find_layers(model).handlers.items()}
    assert shapes == {
        "0": ((11,), (4, 4)),  # diagonal input factor over the vocabulary
        "1": ((5, 5), (3, 3)),  # bias column
        "2": (None, (6, 6)),  # dense block of γ and β
        "3": ((18, 18), (5, 5)),  # C_in·kh·kw
    }
