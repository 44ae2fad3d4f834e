"""How one layer type's captured tensors become curvature statistics.

A layer file only reshapes what the hooks captured: input rows āₘ (with a bias column), output
gradient rows δₘ, and the map between the layer's parameters and its gradient *matrix*. The
averaging and inversion live in :mod:`natgrad.curvature`.

Two families:

* :class:`KroneckerHandler` (Linear, Conv2d, Embedding): the Fisher block of the layer's
  gradient matrix X (``[d_out, d_in]``, row-major) is approximated by G ⊗ A with
  A = (1/(N·T)) Σ āāᵀ and G = (1/N) Σ δδᵀ over the N samples and T positions (sequence
  steps, spatial locations) per sample (Grosse & Martens 2016; Eschenhagen et al. 2023's
  "expand" setting). With T = 1 these are the DESIGN.md factors.
* :class:`DenseHandler` (affine parameters of normalisation layers): per-sample gradients of
  the few parameters give an exact dense block (1/N) Σ gₙgₙᵀ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LayerHandler", "KroneckerHandler", "DenseHandler"]


class LayerHandler:
    """A supported layer: its module and the parameters its curvature block covers."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def params(self) -> list[Tensor]:
        """Parameters of the block, weight first (those with ``requires_grad``)."""
        return [
            p for p in (getattr(self.module, "weight", None), getattr(self.module, "bias", None))
            if p is not None and p.requires_grad
        ]

    # names of blocks that cover the same parameters for other kinds of call (an attention's
    # packed in-projection: one block for self-attention, three for cross-attention); each
    # call feeds one of them, so the others' silence is expected
    alternatives: tuple[str, ...] = ()

    def row_slice(self, param: Tensor) -> slice | None:
        """The rows (first dimension) of ``param`` that the block covers, None for all of it.

        Blocks that own row slices of a parameter (an attention's q, k and v rows of its packed
        in-projection) precondition those rows; :meth:`scatter` returns just those rows.
        """
        return None

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why ``module`` must use the fallback update instead (None if it is supported)."""
        return None

    def call_input(self, inputs: Tensor, output: Tensor) -> Tensor:
        """What a call of the layer records as its input, from its (detached) input and its
        output: the input itself, unless the rows need the output's shape too (a transposed
        convolution records its input spread and padded to the output's size)."""
        return inputs

    def gather(self, grads: dict[Tensor, Tensor]) -> Tensor:
        """The block's parameter gradients as one tensor (a matrix X, or a flat vector)."""
        raise NotImplementedError

    def scatter(self, tensor: Tensor) -> dict[Tensor, Tensor]:
        """Inverse of :meth:`gather`: parameter-shaped pieces of ``tensor`` (the block's
        rows of a parameter it covers partly, see :meth:`row_slice`)."""
        raise NotImplementedError


class KroneckerHandler(LayerHandler):
    """A layer whose weight gradient is a sum of outer products δ āᵀ over positions.

    :meth:`gather` returns the gradient matrix X, ``[d_out, d_in]``.
    """

    diagonal_input = False  # A is diagonal (Embedding) and stored as a vector

    def input_rows(self, inputs: Tensor) -> Tensor:
        """ā for every sample and position, ``[N·T, d_in]`` (bias column last if any)."""
        raise NotImplementedError

    def input_sum(self, inputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, int] | None:
        """Σ āāᵀ over the rows of :meth:`input_rows` in ``dtype`` and their number, where the
        layer has a cheaper route to it than forming the rows (None: form the rows)."""
        return None

    def projected_input_rows(self, inputs: Tensor, basis: Tensor) -> Tensor:
        """:meth:`input_rows` times ``basis`` (``[d_in, d]``) in the basis's dtype, ``[N·T, d]``
        (EKFAC's inputs in A's eigenbasis)."""
        return self.input_rows(inputs).to(basis.dtype) @ basis

    def positions(self, inputs: Tensor) -> tuple[int, ...] | None:
        """The shape ``[N, ...]`` that :meth:`input_rows` flattens, when each row is one
        position of the input (so that rows of positions the loss ignores can be dropped);
        None when rows are not positions (a convolution's patches)."""
        return None

    def grad_rows(self, grad_outputs: Tensor) -> Tensor:
        """δ for every sample and position, ``[N·T, d_out]``, from ∂/∂(layer output)."""
        raise NotImplementedError

    def per_sample_grads(self, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
        """Per-sample gradient matrices Σₜ δ āᵀ, ``[N, d_out, d_in]`` (used by EKFAC)."""
        n = inputs.shape[0]
        rows_in = self.input_rows(inputs)
        rows_out = self.grad_rows(grad_outputs)
        return rows_out.reshape(n, -1, rows_out.shape[1]).transpose(1, 2) @ rows_in.reshape(
            n, -1, rows_in.shape[1]
        )


class DenseHandler(LayerHandler):
    """A layer with few parameters whose per-sample gradients are formed explicitly."""

    def per_sample_grads(self, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
        """gₙ = ∂ log p(yₙ)/∂(params) per sample, ``[N, d]`` (weight then bias)."""
        raise NotImplementedError
