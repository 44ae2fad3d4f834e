"""Where the inverses are computed: blocks placed on ranks so that each does equal work.

Inverting (or eigendecomposing) a d×d factor costs O(d³), a diagonal factor O(d), so a
layer block with factors of sizes d₁, d₂, … costs Σ dᵢ³ (:func:`block_cost`). With
``inverse_placement="balanced"`` every block is computed by one rank, its owner, and the
result is broadcast (Pauloski et al. 2021, KAISA; Osawa et al. 2019 place layers the same
way). Owners come from the greedy *longest processing time first* rule
(:func:`balanced_placement`): blocks in decreasing cost, each to the currently least-loaded
rank. Its largest load is at most 4/3 − 1/(3W) times the best possible (Graham 1969). With
``inverse_placement="everywhere"`` every rank computes every block and nothing is broadcast:
W-fold redundant work in exchange for no inverse traffic. With ``inverse_placement="owner"``
the owner also keeps the block's factors and inverses and preconditions its gradient; the
other ranks hold none of it and receive the block's direction every step (about 1/W of the
state per rank, for a broadcast of the directions each step); there the owners balance the
memory of the blocks' state as well as their cost (:func:`owner_placement`).
``inverse_placement="auto"``
(the optimizers' default, :func:`resolve_placement`) is ``"owner"`` for a model sharded with
FSDP2, whose users shard because the state does not fit, and ``"balanced"`` otherwise.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from natgrad._checks import check_positive_int

__all__ = ["PLACEMENTS", "balanced_placement", "block_cost", "block_size", "owner_placement",
           "rank_loads", "resolve_placement"]

PLACEMENTS = ("auto", "balanced", "everywhere", "owner")


def resolve_placement(placement: str, sharded: bool) -> str:
    """``"auto"`` → ``"owner"`` for FSDP2-sharded parameters (``sharded``), else
    ``"balanced"``; any other placement as it is.

    Example:
        >>> resolve_placement("auto", sharded=True)
        'owner'
    """
    if placement != "auto":
        return placement
    return "owner" if sharded else "balanced"


def block_cost(shapes: Sequence[Sequence[int]]) -> float:
    """Σ dᵢ³ over a block's factors: ``[d, d]`` matrices cost d³, ``[d]`` diagonals d,
    ``[g, d, d]`` batches (grouped convolutions) g·d³.

    Example:
        >>> block_cost([(65, 65), (32, 32)])  # a Linear(64, 32) with bias
        307393.0
    """
    total = 0.0
    for shape in shapes:
        d = float(shape[-1])
        groups = float(shape[0]) if len(shape) == 3 else 1.0  # a batch of g matrices
        total += d if len(shape) == 1 else groups * d**3
    return total


def block_size(shapes: Sequence[Sequence[int]]) -> float:
    """Σ of the numbers in a block's factors (its inverses hold as many): the memory the
    block's state takes on its owner, up to a factor."""
    total = 0.0
    for shape in shapes:
        count = 1.0
        for d in shape:
            count *= d
        total += count
    return total


def balanced_placement(costs: Sequence[float], world_size: int) -> list[int]:
    """Owners that balance the total cost per rank: greedy longest-processing-time first.

    Blocks are taken in decreasing cost (ties: lower index first) and each goes to the rank
    with the least load so far (ties: lower rank). Deterministic, so every rank computes the
    same owners without communicating.

    Args:
        costs: cost of each block (e.g. :func:`block_cost`), ≥ 0.
        world_size: number of ranks, ≥ 1.

    Returns:
        The owner rank of each block, in the order of ``costs``.

    Raises:
        ValueError: if ``world_size`` < 1 or a cost is negative.

    Example:
        >>> balanced_placement([8.0, 1.0, 7.0, 2.0], 2)
        [0, 0, 1, 1]

    References:
        Graham, Bounds on multiprocessing timing anomalies, 1969. Pauloski et al., KAISA:
        an adaptive second-order optimizer framework for deep neural networks, 2021.
    """
    check_positive_int("world_size", world_size)
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (load, rank)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def owner_placement(
    costs: Sequence[float], sizes: Sequence[float], world_size: int
) -> list[int]:
    """Owners that balance both the cost per rank and the memory per rank, for
    ``inverse_placement="owner"`` (where a block's state lives on its owner alone).

    Blocks are taken in decreasing cost (ties: lower index first), as in
    :func:`balanced_placement`, and each goes to the rank whose larger share, of the total
    cost or of the total size, is smallest once the block is added (ties: lower rank): the
    inversion work and the memory are spread together. Deterministic.

    Args:
        costs: cost of each block (:func:`block_cost`), ≥ 0.
        sizes: memory of each block (:func:`block_size`), ≥ 0.
        world_size: number of ranks, ≥ 1.

    Returns:
        The owner rank of each block, in the order of ``costs``.

    Raises:
        ValueError: if ``world_size`` < 1, a cost or size is negative, or the lengths differ.

    Example:
        >>> owner_placement([10.0, 1.0, 1.0, 1.0], [1.0, 3.0, 3.0, 3.0], 2)
        [0, 1, 1, 0]
        >>> balanced_placement([10.0, 1.0, 1.0, 1.0], 2)  # memory 1 and 9
        [0, 1, 1, 1]
    """
    check_positive_int("world_size", world_size)
    if len(costs) != len(sizes):
        raise ValueError(f"costs and sizes must have the same length, got {len(costs)} and "
                         f"{len(sizes)}")
    if any(c < 0 for c in costs) or any(m < 0 for m in sizes):
        raise ValueError("costs and sizes must be >= 0")
    total_cost, total_size = sum(costs) or 1.0, sum(sizes) or 1.0
    owners = [0] * len(costs)
    cost_loads, size_loads = [0.0] * world_size, [0.0] * world_size
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        def share(rank: int, index: int = index) -> float:
            return max((cost_loads[rank] + costs[index]) / total_cost,
                       (size_loads[rank] + sizes[index]) / total_size)

        rank = min(range(world_size), key=lambda r: (share(r), r))
        owners[index] = rank
        cost_loads[rank] += costs[index]
        size_loads[rank] += sizes[index]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost per rank of a placement."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    return loads
