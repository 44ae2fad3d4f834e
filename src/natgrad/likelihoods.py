"""Predictive distributions p(y | f) over a model's outputs f.

Every curvature routine in natgrad is the Fisher of a *log-likelihood*, never of a loss with
its own scaling. A likelihood turns the model's outputs into a distribution and provides the
pieces the curvature code needs:

* ``log_prob(f, y)``: per-sample log-likelihood, summed over all non-batch positions, ``[N]``;
* ``sample(f, generator)``: labels drawn from the model's own predictive distribution;
* ``score(f, y)``: r = ∂ log p(y | f) / ∂f, same shape as ``f``;
* ``output_fisher(f)``: the per-sample output-space Fisher Λ = E_y[r rᵀ], ``[N, K, K]``
  where K is the number of output entries per sample (``f[0].numel()``);
* ``fisher_sqrt(f)``: the symmetric square root Λ^{1/2}, ``[N, K, K]``;
* ``fisher_factor(f)``: a cheap closed-form factor S with S Sᵀ = Λ, ``[N, K, K]``;
* ``fisher_matvec(f, u)``: Λ u without forming Λ, same shape as ``f``;
* ``kl(f_p, f_q)``: KL(p(·|f_p) ‖ p(·|f_q)) per sample, ``[N]``.

Conventions (see DESIGN.md):

* ``"categorical"``: ``f`` are logits ``[N, ..., C]``, y are class indices ``[N, ...]``
  (pairs with ``cross_entropy``); positions in ``...`` are independent.
* ``"gaussian"``: ``f`` are means ``[N, ...]`` of a unit-variance normal, y has ``f``'s shape
  (``mse_loss`` is ½‖y − f‖² up to a factor and a constant).
* ``"bernoulli"``: ``f`` are logits ``[N, ...]``, y ∈ {0, 1} with ``f``'s shape (pairs with
  ``binary_cross_entropy_with_logits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Likelihood", "LikelihoodName", "Categorical", "Gaussian", "Bernoulli", "get_likelihood"]


class LikelihoodName(str, Enum):
    """Names accepted wherever a ``likelihood`` argument is expected."""

    CATEGORICAL = "categorical"
    GAUSSIAN = "gaussian"
    BERNOULLI = "bernoulli"


def _check_outputs(outputs: Tensor) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a Tensor, got {type(outputs).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must be a floating-point tensor, got dtype {outputs.dtype}")
    if outputs.dim() < 2:
        raise ValueError(
            f"outputs must have a batch dimension and at least one output dimension, "
            f"got shape {tuple(outputs.shape)}"
        )


def _symmetric_gram(left: Sequence[Tensor], right: Sequence[Tensor]) -> Tensor:
    """``[k, k]`` of ⟨leftᵢ, rightⱼ⟩ (sums over all elements) for a symmetric form
    (⟨leftᵢ, rightⱼ⟩ = ⟨leftⱼ, rightᵢ⟩): the k(k+1)/2 products as dot products of the flat
    tensors, which neither copy them (an einsum over a stack did, on a language model's
    logits several times their size) nor lose float32 digits over millions of terms."""
    k = len(left)
    flat_left = [t.reshape(-1) for t in left]
    flat_right = [t.reshape(-1) for t in right]
    entries = {(i, j): torch.dot(flat_left[i], flat_right[j]) for i in range(k)
               for j in range(i, k)}
    return torch.stack([torch.stack([entries[min(i, j), max(i, j)] for j in range(k)])
                        for i in range(k)])


def _check_shape(name: str, value: Tensor, reference_name: str, reference: Tensor) -> None:
    """Raise ValueError unless ``value`` is shaped like ``reference``."""
    if value.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
            f"got {tuple(value.shape)}"
        )


class Likelihood:
    """Base class: a family p(y | f) of distributions indexed by the model's outputs ``f``.

    Subclasses implement the private hooks; the public methods check shapes once, here.
    """

    name: str = ""

    # --- public API ---------------------------------------------------------------------
    def log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """log p(y | f) per sample, summed over non-batch positions. Returns ``[N]``."""
        _check_outputs(outputs)
        targets = self.check_targets(outputs, targets)
        return self._log_prob(outputs, targets).reshape(outputs.shape[0], -1).sum(1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one label per sample from p(y | f). Shape and dtype as ``targets`` would have."""
        _check_outputs(outputs)
        with torch.no_grad():
            return self._sample(outputs.detach(), generator)

    def score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """r = ∂ log p(y | f) / ∂f, same shape as ``outputs``."""
        _check_outputs(outputs)
        targets = self.check_targets(outputs, targets)
        return self._score(outputs, targets)

    def output_fisher(self, outputs: Tensor) -> Tensor:
        """Λ = E_{y~p(y|f)}[r rᵀ] per sample, ``[N, K, K]`` with K = ``outputs[0].numel()``."""
        factor = self.fisher_factor(outputs)
        return factor @ factor.transpose(1, 2)

    def fisher_factor(self, outputs: Tensor) -> Tensor:
        """A factor S, ``[N, K, K]``, with S Sᵀ = Λ (closed form, not necessarily symmetric)."""
        _check_outputs(outputs)
        return self._fisher_factor(outputs.detach())

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        """The symmetric positive semi-definite square root Λ^{1/2}, ``[N, K, K]``."""
        fisher = self.output_fisher(outputs)
        eigvals, eigvecs = torch.linalg.eigh(fisher)
        root = eigvals.clamp_min(0).sqrt()
        return (eigvecs * root.unsqueeze(1)) @ eigvecs.transpose(1, 2)

    def fisher_matvec(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        """Λ u per sample without forming Λ. ``vectors`` has the shape of ``outputs``."""
        _check_outputs(outputs)
        _check_shape("vectors", vectors, "outputs", outputs)
        return self._fisher_matvec(outputs.detach(), vectors)

    def fisher_gram(self, outputs: Tensor, vectors: Sequence[Tensor]) -> Tensor:
        """The ``[k, k]`` matrix Σₙ uᵢₙᵀ Λₙ uⱼₙ for k output-space ``vectors`` (each shaped
        like ``outputs``), summed over the batch: the Fisher's Gram matrix of k directions
        J·tᵢ, computed with one evaluation of the model's probabilities."""
        _check_outputs(outputs)
        for v in vectors:
            _check_shape("vectors", v, "outputs", outputs)
        flat = [v.reshape(-1, outputs.shape[-1]) for v in vectors]
        return self._fisher_gram(outputs.detach().reshape(-1, outputs.shape[-1]), flat)

    def kl(self, outputs_p: Tensor, outputs_q: Tensor) -> Tensor:
        """KL(p(·|f_p) ‖ p(·|f_q)) per sample, summed over positions. Returns ``[N]``."""
        _check_outputs(outputs_p)
        _check_outputs(outputs_q)
        _check_shape("outputs_q", outputs_q, "outputs_p", outputs_p)
        return self._kl(outputs_p, outputs_q).reshape(outputs_p.shape[0], -1).sum(1)

    def mean(self, outputs: Tensor) -> Tensor:
        """E[y | f] in the form of the score's targets: class probabilities ``[N, ..., C]``
        for categorical, ``f`` for gaussian, σ(f) for bernoulli (so r = y − mean)."""
        _check_outputs(outputs)
        return self._mean(outputs)

    def cross_entropy(
        self, outputs: Tensor, soft_targets: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """−E_{y~q}[log p(y | f)] per sample for a target distribution q given by its mean
        (``soft_targets`` shaped like :meth:`mean`; one-hot rows give −log p(y | f)), summed
        over the positions that ``valid`` marks (bool, ``[N, ...]`` as the per-position
        values; default: all). ``[N]``"""
        _check_outputs(outputs)
        _check_shape("soft_targets", soft_targets, "outputs", outputs)
        values = self._cross_entropy(outputs, soft_targets)
        if valid is not None:
            values = values * valid.reshape(values.shape).to(values.dtype)
        return values.reshape(outputs.shape[0], -1).sum(1)

    def targets_from_grad(
        self, outputs: Tensor, output_grad: Tensor, scale: float | None = None
    ) -> Tensor:
        """Recover the (soft) targets from ∂L/∂f of a loss L = s · Σ −log p(y|f).

        For all three likelihoods ∂(−log p(y|f))/∂f = mean(f) − y, so y = mean(f) − ∂L/∂f / s
        (exactly, label smoothing included); ``scale`` s defaults to 1/N, the batch mean
        over the N samples.
        """
        scale = 1.0 / outputs.shape[0] if scale is None else scale
        return self.mean(outputs) - output_grad / scale

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Validate ``targets`` against ``outputs``; returns them in the dtype used internally."""
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a Tensor, got {type(targets).__name__}")
        return self._check_targets(outputs, targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # --- hooks for subclasses -------------------------------------------------------------
    def _log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _fisher_factor(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _fisher_matvec(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        raise NotImplementedError

    def _fisher_gram(self, outputs: Tensor, vectors: list[Tensor]) -> Tensor:
        # outputs [M, K], vectors k × [M, K]; subclasses avoid the k matrix-vector products
        return _symmetric_gram([self._fisher_matvec(outputs, v) for v in vectors], vectors)

    def _kl(self, outputs_p: Tensor, outputs_q: Tensor) -> Tensor:
        raise NotImplementedError

    def _mean(self, outputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _cross_entropy(self, outputs: Tensor, soft_targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets must have the shape of outputs {tuple(outputs.shape)} for the "
                f"{self.name} likelihood, got {tuple(targets.shape)}"
            )
        return targets


class Categorical(Likelihood):
    """p(y | f) = softmax(f)_y over the last dimension; Λ = diag(p) − p pᵀ per position."""

    name = "categorical"

    def _check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"targets must have shape {tuple(outputs.shape[:-1])} (outputs without the "
                f"class dimension) for the categorical likelihood, got {tuple(targets.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(
                f"targets must hold integer class indices for the categorical likelihood, "
                f"got dtype {targets.dtype}"
            )
        return targets.long()  # one_hot and gather index with int64

    def _log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        log_probs = outputs.log_softmax(-1)
        return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def _sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        # inverse-CDF sampling: one uniform per position (several times faster than multinomial)
        cdf = outputs.softmax(-1).cumsum(-1)
        uniform = torch.rand(
            cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype, device=cdf.device
        )
        return (cdf < uniform).sum(-1).clamp_max(outputs.shape[-1] - 1)

    def _score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        # ∂ log softmax(f)_y / ∂f = onehot(y) − p
        onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return onehot - outputs.softmax(-1)

    def _fisher_factor(self, outputs: Tensor) -> Tensor:
        # Λ = diag(p) − p pᵀ = M Mᵀ with M = diag(√p) − p √pᵀ (uses Σ p = 1)
        n, classes = outputs.shape[0], outputs.shape[-1]
        probs = outputs.softmax(-1).reshape(n, -1, classes)
        roots = probs.sqrt()
        blocks = torch.diag_embed(roots) - probs.unsqueeze(-1) * roots.unsqueeze(-2)
        # positions are independent: Λ of the flattened output is block diagonal
        eye = torch.eye(blocks.shape[1], dtype=blocks.dtype, device=blocks.device)
        full = torch.einsum("ntij,ts->ntisj", blocks, eye)
        return full.reshape(n, probs[0].numel(), probs[0].numel())

    def _fisher_matvec(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        probs = outputs.softmax(-1)
        return probs * vectors - probs * (probs * vectors).sum(-1, keepdim=True)

    def _fisher_gram(self, outputs: Tensor, vectors: list[Tensor]) -> Tensor:
        # uᵀΛw = Σ p u w − (pᵀu)(pᵀw) per row
        probs = outputs.softmax(-1)
        weighted = [probs * v for v in vectors]
        means = torch.stack([w.sum(-1) for w in weighted])  # [k, M]
        return _symmetric_gram(weighted, vectors) - means @ means.T

    def _kl(self, outputs_p: Tensor, outputs_q: Tensor) -> Tensor:
        log_p, log_q = outputs_p.log_softmax(-1), outputs_q.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def _mean(self, outputs: Tensor) -> Tensor:
        return outputs.softmax(-1)

    def _cross_entropy(self, outputs: Tensor, soft_targets: Tensor) -> Tensor:
        return -(soft_targets * outputs.log_softmax(-1)).sum(-1)


class Gaussian(Likelihood):
    """p(y | f) = N(y; f, I): unit variance, so Λ = I."""

    name = "gaussian"

    def _check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = super()._check_targets(outputs, targets)
        if not targets.is_floating_point():
            raise TypeError(
                f"targets must be floating point for the gaussian likelihood, got {targets.dtype}"
            )
        return targets

    def _log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -0.5 * (targets - outputs) ** 2 - 0.5 * math.log(2 * math.pi)

    def _sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(
            outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        return outputs + noise

    def _score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return targets - outputs

    def _fisher_factor(self, outputs: Tensor) -> Tensor:
        n, k = outputs.shape[0], outputs[0].numel()
        eye = torch.eye(k, dtype=outputs.dtype, device=outputs.device)
        return eye.expand(n, k, k).clone()

    def _fisher_matvec(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        return vectors

    def _fisher_gram(self, outputs: Tensor, vectors: list[Tensor]) -> Tensor:
        return _symmetric_gram(vectors, vectors)

    def _kl(self, outputs_p: Tensor, outputs_q: Tensor) -> Tensor:
        return 0.5 * (outputs_p - outputs_q) ** 2

    def _mean(self, outputs: Tensor) -> Tensor:
        return outputs

    def _cross_entropy(self, outputs: Tensor, soft_targets: Tensor) -> Tensor:
        # the mean's own variance term is a constant in f and is left out
        return 0.5 * (soft_targets - outputs) ** 2 + 0.5 * math.log(2 * math.pi)


class Bernoulli(Likelihood):
    """p(y | f) = Π σ(f)^y (1 − σ(f))^(1−y) elementwise; Λ = diag(σ(f)(1 − σ(f)))."""

    name = "bernoulli"

    def _check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = super()._check_targets(outputs, targets)
        if targets.is_complex():
            raise TypeError(
                f"targets must be real for the bernoulli likelihood, got {targets.dtype}"
            )
        return targets.to(outputs.dtype)

    def _log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")

    def _sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(outputs.sigmoid(), generator=generator)

    def _score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return targets - outputs.sigmoid()

    def _fisher_factor(self, outputs: Tensor) -> Tensor:
        probs = outputs.sigmoid().reshape(outputs.shape[0], -1)
        return torch.diag_embed((probs * (1 - probs)).sqrt())

    def _fisher_matvec(self, outputs: Tensor, vectors: Tensor) -> Tensor:
        probs = outputs.sigmoid()
        return probs * (1 - probs) * vectors

    def _fisher_gram(self, outputs: Tensor, vectors: list[Tensor]) -> Tensor:
        probs = outputs.sigmoid()
        weight = probs * (1 - probs)
        return _symmetric_gram([v * weight for v in vectors], vectors)

    def _kl(self, outputs_p: Tensor, outputs_q: Tensor) -> Tensor:
        prob = outputs_p.sigmoid()
        log_ratio_one = F.logsigmoid(outputs_p) - F.logsigmoid(outputs_q)
        log_ratio_zero = F.logsigmoid(-outputs_p) - F.logsigmoid(-outputs_q)
        return prob * log_ratio_one + (1 - prob) * log_ratio_zero

    def _mean(self, outputs: Tensor) -> Tensor:
        return outputs.sigmoid()

    def _cross_entropy(self, outputs: Tensor, soft_targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, soft_targets, reduction="none")


_LIKELIHOODS: dict[str, type[Likelihood]] = {
    LikelihoodName.CATEGORICAL.value: Categorical,
    LikelihoodName.GAUSSIAN.value: Gaussian,
    LikelihoodName.BERNOULLI.value: Bernoulli,
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Resolve a likelihood name (or instance) to a :class:`Likelihood`.

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
        TypeError: for anything that is neither a string nor a Likelihood.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(
            f"likelihood must be a str or a natgrad Likelihood, got {type(likelihood).__name__}"
        )
    key = likelihood.value if isinstance(likelihood, LikelihoodName) else likelihood
    if key not in _LIKELIHOODS:
        raise ValueError(
            f"likelihood must be one of {sorted(_LIKELIHOODS)}, got {likelihood!r}"
        )
    return _LIKELIHOODS[key]()
