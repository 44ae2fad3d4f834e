"""The loss as users write it, and the one canonical scale natgrad works on.

Users write torch's losses with torch's reductions: ``F.mse_loss``'s mean over every element,
``F.cross_entropy`` over ``[B, T, V]`` logits flattened to tokens with ``ignore_index``
padding, a sum, or any of these divided by k for gradient accumulation. natgrad works on one
canonical objective, whatever the user wrote:

    J(θ) = (1/N) Σₙ Σ_{valid positions t of n} −log p(y_{n,t} | f_{n,t}(θ)),

the batch mean (N = rows of the model's input, dimension 0) of each example's negative
log-likelihood summed over its outputs. Ignored positions (``ignore_index``) are not
outputs of the likelihood: they contribute nothing to J, to any curvature statistic, to the
sampled labels or to the step's checks.

A :class:`LossSpec` says how one forward's loss L relates to J: ∂L/∂f = s · ∂(Σ nll)/∂f with
the *sum scale* s of :meth:`LossSpec.sum_scale` (``1/N`` for the canonical batch mean,
``2/numel`` for ``MSELoss()``'s mean over elements — (f−y)² is twice the Gaussian's
½(f−y)² —, ``1/n_valid`` for a token mean, ...). The natural gradient does not depend on
how the loss is normalised; with s known, natgrad's damping, quadratic model and
reduction ratio do not either.

Gradient accumulation: when k forwards are backpropagated before one ``step()``, each
forward's loss is taken to be divided by k (``(loss / k).backward()``, the usual recipe);
k micro-batches of equal size then give the step of their concatenated batch.

Which positions are ignored is read off the loss's gradient with respect to the model's
output: an ignored position's gradient row is exactly zero (kfac-jax detects padding the
same way). A valid position's row is zero only if the model's prediction equals the target
to the last bit, where its loss and Fisher are zero too; it is then counted as ignored,
which changes a token mean's count and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from natgrad.likelihoods import Likelihood, get_likelihood

__all__ = ["LossSpec", "REDUCTIONS", "resolve_loss"]

REDUCTIONS = ("batch", "mean", "sum")
_LIKELIHOOD_OF = {
    nn.CrossEntropyLoss: "categorical",
    nn.MSELoss: "gaussian",
    nn.BCEWithLogitsLoss: "bernoulli",
}


class LossSpec:
    """How the user's loss relates to the canonical objective J (see the module doc).

    Args:
        likelihood: the predictive distribution (a name or a :class:`Likelihood`).
        reduction: ``"batch"`` — the mean over the batch of each example's NLL summed over
            its outputs (J itself; what ``likelihood=`` means); ``"mean"`` — torch's mean
            over every element (over valid positions for cross entropy); ``"sum"``.
        ignore_index: for the categorical likelihood, the label of ignored positions (their
            gradient rows are zero); None when nothing is ignored.
        label_smoothing: torch's ``label_smoothing`` (the targets recovered from the
            gradient are then the smoothed ones; nothing else changes).
        factor: the loss per unit of negative log-likelihood (2 for ``MSELoss``).
    """

    def __init__(
        self,
        likelihood: str | Likelihood,
        reduction: str = "batch",
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        factor: float = 1.0,
    ) -> None:
        self.likelihood = get_likelihood(likelihood)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        if ignore_index is not None and self.likelihood.name != "categorical":
            raise ValueError("ignore_index is only defined for the categorical likelihood")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.factor = float(factor)

    @classmethod
    def from_module(cls, loss: nn.Module) -> LossSpec:
        """The spec of a torch loss module; ValueError/TypeError for one natgrad can't represent.

        Supported: ``nn.CrossEntropyLoss`` (reduction ``"mean"`` or ``"sum"``,
        ``ignore_index``, ``label_smoothing``), ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss``
        (``"mean"`` or ``"sum"``). Class weights, ``pos_weight`` and ``reduction="none"``
        change the likelihood or leave the normalisation to the user and are refused.
        """
        if not isinstance(loss, nn.Module):
            raise TypeError(
                f"loss must be a torch loss module (nn.CrossEntropyLoss, nn.MSELoss or "
                f"nn.BCEWithLogitsLoss), got {type(loss).__name__}"
            )
        kind = next((k for k in _LIKELIHOOD_OF if type(loss) is k), None)
        if kind is None:
            raise TypeError(
                f"loss must be nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss, got "
                f"{type(loss).__name__}"
            )
        name = type(loss).__name__
        reduction = getattr(loss, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss: {name} with reduction={reduction!r} is not supported; use reduction "
                "'mean' or 'sum' (natgrad needs to know how the loss is normalised)"
            )
        if getattr(loss, "weight", None) is not None:
            raise ValueError(
                f"loss: {name} with class weights is not supported (a weighted loss is not "
                "the negative log-likelihood of a categorical or Bernoulli model)"
            )
        if getattr(loss, "pos_weight", None) is not None:
            raise ValueError(
                f"loss: {name} with pos_weight is not supported (a weighted loss is not the "
                "negative log-likelihood of a Bernoulli model)"
            )
        if kind is nn.CrossEntropyLoss:
            return cls("categorical", reduction, ignore_index=loss.ignore_index,
                       label_smoothing=loss.label_smoothing)
        return cls(_LIKELIHOOD_OF[kind], reduction, factor=2.0 if kind is nn.MSELoss else 1.0)

    def __repr__(self) -> str:
        return (f"LossSpec({self.likelihood.name!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index!r}, label_smoothing={self.label_smoothing}, "
                f"factor={self.factor})")

    # --- positions ------------------------------------------------------------------------
    def valid(self, output: Tensor, output_grad: Tensor) -> Tensor | None:
        """Which positions count, ``[N, ...]`` (the outputs' shape without the class
        dimension) as bool, read off ∂L/∂f; None when every position counts.

        An ignored position has a zero gradient, but so has a position the model fits
        exactly: its gradient s·(p − y) underflows to zero once p is one-hot to the output's
        precision (a classifier trained to a loss near 0 in float32; all of a batch's
        positions at a loss of exactly 0). A zero-gradient position counts unless the model
        is less sure of its class than 1 − 4ε (ε of the output's dtype)."""
        if self.ignore_index is None:
            return None
        valid = output_grad.detach().ne(0).any(-1)
        if bool(valid.all()):
            return None
        zero = ~valid  # the class probabilities of the zero-gradient positions only
        dtype = torch.promote_types(output.dtype, torch.float32)
        confident = output.detach()[zero].to(dtype).softmax(-1).amax(-1)
        valid[zero] = confident >= 1 - 4 * torch.finfo(output.dtype).eps
        return None if bool(valid.all()) else valid

    def valid_from_targets(self, outputs: Tensor, targets: Tensor | None) -> Tensor | None:
        """Which positions count, from observed targets (``!= ignore_index``), ``[N, ...]``."""
        if self.ignore_index is None or targets is None:
            return None
        return self.shaped_targets(outputs, targets).ne(self.ignore_index)

    def positions(self, outputs: Tensor) -> int:
        """How many positions one forward's outputs hold (elements; tokens for categorical)."""
        if self.likelihood.name == "categorical":
            return outputs.numel() // outputs.shape[-1]
        return outputs.numel()

    # --- scale ----------------------------------------------------------------------------
    def sum_scale(self, outputs: Tensor, valid: Tensor | None) -> float:
        """s such that one forward's loss is L = s · Σ nll over its valid positions.

        The canonical J of the forward is (1/N) Σ nll, so ∂J/∂f = ∂L/∂f / (N·s).
        """
        if self.reduction == "sum":
            return self.factor
        if self.reduction == "batch":
            return self.factor / outputs.shape[0]
        count = self.positions(outputs) if valid is None else int(valid.sum())
        return self.factor / max(count, 1)

    def fisher_scale(self, outputs: Tensor, valid: Tensor | None) -> float:
        """c = N·s: the loss is c·J, so the curvature of the loss is c times the canonical
        (batch-mean) Fisher. Exactly ``factor`` for the batch mean (N·(1/N) rounds for some
        N, e.g. 49)."""
        if self.reduction == "batch":
            return self.factor
        return outputs.shape[0] * self.sum_scale(outputs, valid)

    # --- targets --------------------------------------------------------------------------
    def shaped_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``targets`` in the shape the likelihood expects for ``outputs``: with ``loss=``
        they may come flattened as the user passes them to the loss (``y.view(-1)`` for
        ``[B, T, V]`` logits); ``likelihood=`` takes them as they are."""
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        categorical = self.likelihood.name == "categorical"
        shape = outputs.shape[:-1] if categorical else outputs.shape
        reshape = targets.shape != shape and targets.numel() == shape.numel()
        if self.reduction != "batch" and reshape:
            targets = targets.reshape(shape)
        return targets

    def soft_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Observed targets in the form of :meth:`Likelihood.mean` (class probabilities for
        categorical, smoothed if ``label_smoothing``; ignored positions get class 0)."""
        targets = self.shaped_targets(outputs, targets)
        if self.likelihood.name != "categorical":
            return self.likelihood.check_targets(outputs, targets)
        labels = self.likelihood.check_targets(outputs, targets)
        if self.ignore_index is not None:
            labels = torch.where(labels.ne(self.ignore_index), labels, torch.zeros_like(labels))
        classes = outputs.shape[-1]
        onehot = torch.nn.functional.one_hot(labels, classes).to(outputs.dtype)
        eps = self.label_smoothing
        return onehot * (1 - eps) + eps / classes if eps else onehot


def resolve_loss(likelihood: Any = None, loss: Any = None, required: bool = False) -> LossSpec:
    """The :class:`LossSpec` from an optimizer's or function's ``likelihood=`` / ``loss=``.

    At most one may be given; neither means ``likelihood="categorical"`` (a ValueError if
    ``required``). ``likelihood=``
    keeps its meaning: the loss is the batch mean of each example's negative
    log-likelihood summed over its outputs (``reduction="batch"``).
    """
    if likelihood is not None and loss is not None:
        raise ValueError(
            "give either likelihood= or loss=, not both: loss= (a torch loss module) defines "
            "the likelihood and how the loss is normalised"
        )
    if required and likelihood is None and loss is None:
        raise ValueError(
            "likelihood= (a name or a Likelihood) or loss= (a torch loss module) is required"
        )
    if isinstance(loss, LossSpec):
        return loss
    if loss is not None:
        return LossSpec.from_module(loss)
    return LossSpec("categorical" if likelihood is None else likelihood)
