"""``natgrad fisher``'s comparison against independent dense references."""

from __future__ import annotations

import torch
from torch import nn

from conftest import RTOL_EXACT, brute_force_fisher, rel_err
from natgrad.bench.approximations import compare_approximations, kronecker_blocks

DTYPE = torch.float64


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(1, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (1,))
    return model, x, y


def test_kfac_block_equals_the_exact_block_for_one_sample_one_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(1, 5, dtype=DTYPE)
    fisher = brute_force_fisher(model, x, "categorical")
    kfac, ekfac = kronecker_blocks(model, x, "categorical", fisher)
    assert rel_err(kfac, fisher) <= RTOL_EXACT
    assert rel_err(ekfac, fisher) <= RTOL_EXACT


def test_rows_are_consistent():
    model, x, y = _problem()
    x = torch.cat([x, torch.randn(15, 5, dtype=DTYPE)])
    y = torch.cat([y, torch.randint(0, 3, (15,))])
    rows = {r.method: r for r in compare_approximations(model, x, y, "categorical",
                                                         damping=1e-2, cg_iterations=(1, 200))}
    # EKFAC is never further from F than K-FAC (it fits the diagonal in the same basis)
    assert rows["EKFAC"].fisher_error <= rows["K-FAC"].fisher_error + 1e-12
    # CG run to convergence reaches the exact natural gradient
    assert rows["CG, 200 iterations"].direction_error <= 1e-6
    assert abs(rows["CG, 200 iterations"].cosine - 1.0) <= 1e-10
    # one CG step from zero is along the gradient
    assert abs(rows["CG, 1 iterations"].cosine - rows["gradient (identity)"].cosine) <= 1e-10
    for row in rows.values():
        assert -1.0 <= row.cosine <= 1.0 + 1e-12
