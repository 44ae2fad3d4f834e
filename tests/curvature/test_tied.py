"""A weight tied between an input embedding and an output head: one block for both uses.

Float64, a tiny tied language model, against the exact Fisher block of the tied weight
(F = (1/N) Σₙ Jₙᵀ Λₙ Jₙ, Jₙ = ∂fₙ/∂W through *both* uses by
``torch.autograd.functional.jacobian`` over ``functional_call`` (which keeps the tie), Λₙ the
softmax's Fisher per position):

* natgrad's shared block, the sum of the two uses' Kronecker products L₁⊗R₁ + L₂⊗R₂ (each
  use's exact-expectation factors from ``kfac_factors``, in W's orientation), is closer to it
  than either product alone and than the diagonal; its error is printed next to untied
  K-FAC's on the same model with the weights untied;
* the block's preconditioning is the exact inverse of its π-damped sum (a dense solve);
* KFAC and EKFAC train the tied model with one block for the weight and no fallback.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad
from conftest import DTYPE, RTOL_EXACT, rel_err, train_losses
from natgrad.curvature.kfac import pi_damping
from natgrad.curvature.shared import SharedBlock, SharedHandler
from natgrad.layers.embedding import EmbeddingHandler
from natgrad.layers.linear import LinearHandler

V, D, T, N = 6, 4, 3, 5


class TiedLM(nn.Module):
    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def setup(scale: float, tied: bool = True):
    torch.manual_seed(0)
    model = TiedLM(tied).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    tokens = torch.randint(V, (N, T), generator=torch.Generator().manual_seed(1))
    return model, tokens


def exact_block(model: nn.Module, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1/N) Σₙ Jₙᵀ Λₙ Jₙ for one weight, every other parameter held."""
    name = next(n for n, p in model.named_parameters() if p is weight)
    total = torch.zeros(weight.numel(), weight.numel(), dtype=DTYPE)
    for x in tokens:
        def f(w, x=x):
            out = torch.func.functional_call(model, {name: w}, (x.unsqueeze(0),), strict=False)
            return out.reshape(-1)

        J = torch.autograd.functional.jacobian(f, weight.detach()).reshape(-1, weight.numel())
        probs = f(weight.detach()).reshape(T, V).softmax(-1).detach()
        lam = torch.block_diag(*(torch.diag(p) - torch.outer(p, p) for p in probs))
        total += J.T @ lam @ J
    return total / tokens.shape[0]


def kron(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.kron(torch.diag(left) if left.dim() == 1 else left, right)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_the_shared_block_is_closer_to_the_tied_block_than_the_alternatives(scale):
    model, tokens = setup(scale)
    factors = natgrad.kfac_factors(model, tokens, likelihood="categorical")
    assert set(factors) == {"embed", "mix", "head"}  # each use of the tie has its factors
    exact = exact_block(model, tokens, model.head.weight)
    a_emb, g_emb = factors["embed"]  # embedding: L = diag(A), R = G in W's orientation
    a_head, g_head = factors["head"]  # head: L = G, R = A
    embedding, head = kron(a_emb, g_emb), kron(g_head, a_head)
    errors = {
        "sum of the uses' products": rel_err(embedding + head, exact),
        "embedding use alone": rel_err(embedding, exact),
        "head use alone": rel_err(head, exact),
        "diagonal": rel_err(torch.diag(exact.diagonal()), exact),
    }
    untied, _ = setup(scale, tied=False)
    untied_factors = natgrad.kfac_factors(untied, tokens, likelihood="categorical")
    errors["untied K-FAC, head block"] = rel_err(
        kron(untied_factors["head"][1], untied_factors["head"][0]),
        exact_block(untied, tokens, untied.head.weight))
    errors["untied K-FAC, embedding block"] = rel_err(
        kron(*untied_factors["embed"]), exact_block(untied, tokens, untied.embed.weight))
    print(f"scale {scale}: relative Frobenius errors against the exact block:", errors)
    best_other = min(v for k, v in errors.items() if k != "sum of the uses' products"
                     and not k.startswith("untied"))
    assert errors["sum of the uses' products"] < best_other
    # natgrad's block holds exactly these factors after one statistics step (decay 0)
    opt = natgrad.KFAC(model, likelihood="categorical", kind="empirical", stat_every=1,
                       stat_decay=0.0, lr=0.1, damping=1e-2, momentum=0.0, kl_clip=None)
    assert "embed+head" in opt.blocks


def test_shared_preconditioning_is_the_exact_damped_inverse():
    model, tokens = setup(2.0)
    factors = natgrad.kfac_factors(model, tokens, likelihood="categorical")
    handler = SharedHandler(model.head.weight, {"embed": EmbeddingHandler(model.embed),
                                                "head": LinearHandler(model.head)})
    assert handler.transposed == {"embed": True, "head": False}
    state = {"input_cov.0": factors["embed"][0], "grad_cov.0": factors["embed"][1],
             "input_cov.1": factors["head"][0], "grad_cov.1": factors["head"][1]}
    block = SharedBlock(handler, state)
    damping = 1e-2
    block.refresh(damping, "cholesky", DTYPE)
    (l1, r1), (l2, r2) = block.factors()
    d_left, d_right = pi_damping(l1, r1, damping)
    dense = kron(l1 + d_left, r1 + d_right * torch.eye(D, dtype=DTYPE)) + kron(l2, r2)
    x = torch.randn(V, D, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    expected = torch.linalg.solve(dense, x.reshape(-1)).reshape(V, D)
    assert rel_err(block.precondition(x), expected) <= RTOL_EXACT
    undamped = kron(l1, r1) + kron(l2, r2)
    assert rel_err(block.quadratic(x), x.reshape(-1) @ undamped @ x.reshape(-1)) <= RTOL_EXACT


@pytest.mark.parametrize("optimizer", ["KFAC", "EKFAC"])
def test_optimizers_train_the_tied_model_with_one_block(optimizer):
    model, tokens = setup(2.0)
    targets = torch.roll(tokens, -1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback for the tied weight
        opt = getattr(natgrad, optimizer)(model, loss=nn.CrossEntropyLoss(), stat_every=1)
    assert "embed+head" in opt.blocks and opt.fallback == []
    before = model.embed.weight.detach().clone()
    losses = train_losses(opt, model, tokens, targets, 10)
    assert opt.state["natgrad"]["skipped_steps"] == 0
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.head.weight is model.embed.weight  # still tied, and it moved
    assert not torch.equal(model.embed.weight, before)
    assert opt.blocks["embed+head"].refreshed
