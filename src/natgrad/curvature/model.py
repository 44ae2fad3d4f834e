"""A model seen as a function of its parameters, and the output-space pieces of the Fisher.

Every exact curvature quantity in natgrad is built from two ingredients:

* the per-sample Jacobian Jₙ = ∂fₙ/∂θ, ``[K, P]``, of the flattened outputs fₙ (K entries)
  with respect to the flattened parameters θ (P entries, ``model.parameters()`` order);
* an output-space factor Sₙ, ``[K, R]``, chosen by the Fisher ``kind``, so that

      F = (1/N) Σₙ Jₙᵀ Sₙ Sₙᵀ Jₙ.

  ``true``: Sₙ Sₙᵀ = Λₙ, the likelihood's output Fisher (R = K);
  ``mc``: Sₙ = [r₁ … r_M] / √M with r_m the score of a label drawn from the model (R = M);
  ``empirical``: Sₙ = rₙ, the score of the observed target (R = 1).
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from enum import Enum

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from natgrad._calls import CallLayout, model_output
from natgrad._checks import check_positive_int
from natgrad.curvature.forward_rules import ForwardRules
from natgrad.curvature.stacked import StackedTangents, Unsupported
from natgrad.curvature.tangents import supports_trace
from natgrad.likelihoods import Likelihood
from natgrad.losses import LossSpec

__all__ = [
    "FisherKind",
    "FisherTooLargeError",
    "FunctionalModel",
    "check_kind",
    "output_factor",
    "is_missing_forward_ad",
    "mark_reverse_only",
    "position_weights",
    "product_kernels",
    "reverse_only",
    "sampled_score",
    "unstacked_reason",
]

Inputs = Tensor | Sequence[Tensor]


class FisherKind(str, Enum):
    """Which Fisher: the exact expectation, a sampled estimate, or the empirical Fisher."""

    TRUE = "true"
    MC = "mc"
    EMPIRICAL = "empirical"


class FisherTooLargeError(MemoryError):
    """The dense Fisher (or the Jacobian behind it) would not fit in memory."""


def check_kind(kind: str, targets: Tensor | None, mc_samples: int) -> FisherKind:
    """Validate ``kind`` together with the arguments it needs."""
    allowed = [k.value for k in FisherKind]
    if not isinstance(kind, str) or kind not in allowed:
        raise ValueError(f"kind must be one of {allowed}, got {kind!r}")
    kind = FisherKind(kind)
    if kind is FisherKind.EMPIRICAL and targets is None:
        raise ValueError("targets are required for kind='empirical' (the observed labels)")
    check_positive_int("mc_samples", mc_samples)
    return kind


def as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    """Normalise model inputs to a tuple of tensors batched along dimension 0."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, Tensor) for x in inputs):
        return tuple(inputs)
    raise TypeError("inputs must be a Tensor or a non-empty tuple/list of Tensors")


def position_weights(
    spec: LossSpec, outputs: Tensor, targets: Tensor | None, valid: Tensor | None = None
) -> Tensor | None:
    """1 where an output entry's position counts, 0 where it is ignored, shaped like
    ``outputs``, from ``valid`` (``[N, ...]`` bool) if given, else from the ``targets``
    (``ignore_index``); None when every position counts."""
    if valid is None:
        valid = spec.valid_from_targets(outputs, targets)
    if valid is None:
        return None
    if spec.likelihood.name == "categorical":
        valid = valid.unsqueeze(-1)
    return valid.expand_as(outputs).to(outputs.dtype)


def sampled_score(
    likelihood: Likelihood,
    outputs: Tensor,
    generator: torch.Generator | None,
    valid: Tensor | None = None,
) -> Tensor:
    """The score ∂ log p(ŷ | f)/∂f of labels ŷ drawn from the model, shaped like ``outputs``.

    With ``valid`` (``[N, ...]`` bool over the categorical positions), labels are drawn only
    for the valid positions, in order, and the score is zero elsewhere: padding consumes no
    random numbers, so padded data draws the labels of the same data without the padding.
    """
    if valid is None:
        return likelihood.score(outputs, likelihood.sample(outputs, generator))
    kept = outputs[valid]  # [n_valid, C]
    score = torch.zeros_like(outputs)
    score[valid] = likelihood.score(kept, likelihood.sample(kept, generator))
    return score


def output_factor(
    spec: LossSpec,
    outputs: Tensor,
    kind: FisherKind,
    targets: Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The output-space factor Sₙ of the chosen Fisher kind, ``[N, K, R]`` (see module doc).

    Rows of positions that the loss ignores (``valid`` False, or ``ignore_index`` in
    ``targets``) are zero.
    """
    outputs = outputs.detach()
    likelihood = spec.likelihood
    n = outputs.shape[0]
    if kind is FisherKind.TRUE:
        factor = likelihood.fisher_factor(outputs)
    elif kind is FisherKind.EMPIRICAL:
        score = spec.soft_targets(outputs, targets) - likelihood.mean(outputs)
        factor = score.reshape(n, -1, 1)
    else:
        if valid is None:
            valid = spec.valid_from_targets(outputs, targets)
        scores = [
            sampled_score(likelihood, outputs, generator, valid).reshape(n, -1)
            for _ in range(mc_samples)
        ]
        factor = torch.stack(scores, dim=-1) / math.sqrt(mc_samples)
    weights = position_weights(spec, outputs, targets, valid)
    return factor if weights is None else factor * weights.reshape(n, -1, 1)


class FunctionalModel:
    """Wraps an ``nn.Module`` as f(θ, x) over the parameters that carry gradients.

    Args:
        model: any module whose parameters are tensors.
        output_fn: maps the module's raw output to the likelihood's parameters (for modules
            that return a dict or a tuple); identity by default.
        params: the parameters to differentiate (default: all with ``requires_grad``, in
            ``model.parameters()`` order); the others are held fixed.
        layout: how a tuple of inputs maps onto the model's arguments (keyword arguments
            of a recorded forward, :class:`natgrad._calls.CallLayout`); default: all
            positional.
        values: the tensors at which to evaluate, one per parameter (default: the
            parameters themselves); whole tensors for a model sharded with ``fully_shard``,
            swapped into its modules for every evaluation.
    """

    def __init__(
        self,
        model: nn.Module,
        output_fn: Callable[[object], Tensor] | None = None,
        params: Sequence[Tensor] | None = None,
        layout: CallLayout | None = None,
        *,
        values: Sequence[Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.output_fn = output_fn
        self.layout = layout
        named = dict(model.named_parameters())
        if params is None:
            self.names = [name for name, p in named.items() if p.requires_grad]
        else:
            by_id = {id(p): name for name, p in named.items()}
            missing = [i for i, p in enumerate(params) if id(p) not in by_id]
            if missing:
                raise ValueError("params must all be parameters of model")
            self.names = [by_id[id(p)] for p in params]
        if not self.names:
            raise ValueError("model has no parameters that require gradients")
        self.params = [named[name] for name in self.names]
        self.values = self.params if values is None else list(values)
        if len(self.values) != len(self.params):
            raise ValueError("values must hold one tensor per parameter")
        self.num_params = sum(p.numel() for p in self.params)
        # a Sequential of Linear/Conv2d layers and activations calls nothing the forward rules
        # take; there, the dispatch through them would only add ~5% to the product
        self._forward_rules = not supports_trace(model)

    def detached_params(self) -> tuple[Tensor, ...]:
        return tuple(v.detach() for v in self.values)

    def call(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """The model's (extracted) outputs on ``inputs``, called as recorded."""
        raw = self.model(*inputs) if self.layout is None else self.layout.call(self.model, inputs)
        return model_output(raw, self.output_fn)

    def outputs(
        self, params: Sequence[Tensor], inputs: tuple[Tensor, ...], frozen_buffers: bool = False
    ) -> Tensor:
        """The model's (extracted) outputs at parameters ``params``, ``[N, ...]``.

        ``frozen_buffers`` runs the model on copies of its buffers, so that a forward in
        training mode leaves running statistics (BatchNorm) untouched.
        """
        tensors = dict(zip(self.names, params, strict=True))
        if frozen_buffers:
            tensors = {**{n: b.clone() for n, b in self.model.named_buffers()}, **tensors}
        if self.layout is None:
            out = torch.func.functional_call(self.model, tensors, inputs, strict=False)
        else:
            positional = inputs[: self.layout.positional]
            out = torch.func.functional_call(self.model, tensors, positional,
                                             self.layout.keywords_of(inputs), strict=False)
        return model_output(out, self.output_fn)

    def jvp(
        self, inputs: tuple[Tensor, ...], tangents: Sequence[Sequence[Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        """Outputs at the current parameters and J·t for each tangent t, ``[N, ...]`` each.

        First choice, :meth:`jvp_stacked`: one pass that computes the outputs once and all k
        tangents together (on the bench's char-gpt and small Hugging Face GPT-2 and Llama,
        k = 2 costs about 0.7× of the passes per tangent below). For k = 1, with nothing to
        share, it costs 3-10 % more than the one pass below, but it is taken too: the first
        forward-mode pass in a process pays a one-time set-up of PyTorch's forward-mode
        formulas (char-gpt's first step 154 ms against 63 with the stacked pass; a
        convolutional autoencoder's first product 295 ms against 7), and the quadratic model
        has one tangent only on its first step (and on ``momentum_every``'s kept-ratio
        steps). A model whose forward calls something the stacked pass does not take
        (:mod:`natgrad.curvature.stacked`) is switched, for good, to forward-mode AD on the
        module itself, one pass per tangent, with its
        parameters swapped for dual tensors (cheaper than ``torch.func.jvp`` over
        ``functional_call``); buffers are copies, so running statistics are not touched.
        There, attention and binary operations with a constant operand use natgrad's
        forward-mode rules (:mod:`natgrad.curvature.forward_rules`), and attention those rules
        do not take runs on PyTorch's math kernel (:func:`product_kernels`: the fused kernels
        have no forward-mode AD). An operation without forward-mode AD (a custom
        ``autograd.Function`` without ``jvp``) switches this model, for good, to
        reverse-over-reverse products (:meth:`jvp_reverse`), which need only backward
        formulas.
        """
        if reverse_only(self.model):
            return self.jvp_reverse(inputs, tangents)
        if stacked_allowed(self.model) and not _stacking_off():
            try:
                return self.jvp_stacked(inputs, tangents)
            except Exception as error:  # noqa: BLE001 - any failure: the per-tangent pass
                # Unsupported, or an error the rules did not foresee (memory for k tangents
                # at once, say): the passes below give the products or raise the model's error
                mark_unstacked(self.model, f"{type(error).__name__}: {error}")
        try:
            return self._jvp_forward(inputs, tangents)
        except (NotImplementedError, RuntimeError) as error:
            if not is_missing_forward_ad(error):
                raise
            mark_reverse_only(self.model)
            return self.jvp_reverse(inputs, tangents)

    def _jvp_forward(
        self, inputs: tuple[Tensor, ...], tangents: Sequence[Sequence[Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        products = []
        outputs = None
        with torch.no_grad(), fwAD.dual_level(), warnings.catch_warnings(), product_kernels():
            # torch's own forward-mode code warns about its use of torch.jit.script
            warnings.simplefilter("ignore", DeprecationWarning)
            for tangent in tangents:  # t -> J t
                duals = {
                    id(p): fwAD.make_dual(v.detach(), t)
                    for p, v, t in zip(self.params, self.values, tangent, strict=True)
                }
                rules = ForwardRules() if self._forward_rules else nullcontext()
                with swapped_tensors(self.model, duals, frozen_buffers=True), rules:
                    out = self.call(inputs)
                outputs, product = fwAD.unpack_dual(out)
                products.append(torch.zeros_like(outputs) if product is None else product)
        return outputs, products

    def jvp_stacked(
        self, inputs: tuple[Tensor, ...], tangents: Sequence[Sequence[Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        """:meth:`jvp` in one pass for all k tangents (:mod:`natgrad.curvature.stacked`):
        the primal once, every operation's derivative applied to the k tangents stacked.

        Raises:
            Unsupported: the model calls something the stacked pass does not take (the
                products must then go one tangent at a time).
        """
        k = len(tangents)
        if not all(type(v) in (Tensor, nn.Parameter) and not v.is_nested for v in self.values):
            raise Unsupported("parameters that are tensor subclasses")
        values = {id(p): v.detach() for p, v in zip(self.params, self.values, strict=True)}
        mode = StackedTangents(k)
        for j, p in enumerate(self.params):  # [k, *p.shape] per parameter
            mode.seed(values[id(p)], torch.stack([tangent[j] for tangent in tangents]))
        try:
            with torch.no_grad(), product_kernels(), \
                    swapped_tensors(self.model, values, frozen_buffers=True), mode:
                out = self.call(inputs)
                stacked = mode.tangent(out)
        except Exception as error:
            if mode.refusal is None or isinstance(error, Unsupported):
                raise
            raise Unsupported(mode.refusal) from error  # TorchScript wraps the refusal

        if stacked is None:
            return out, [torch.zeros_like(out) for _ in range(k)]
        return out, list(stacked.unbind(0))

    def jvp_reverse(
        self, inputs: tuple[Tensor, ...], tangents: Sequence[Sequence[Tensor]]
    ) -> tuple[Tensor, list[Tensor]]:
        """:meth:`jvp` by reverse over reverse: g(u) = Jᵀu is linear in u, so J·t is the
        gradient of ⟨g(u), t⟩ with respect to u (one forward, one backward with its graph,
        one backward per tangent)."""
        leaves = {id(p): v.detach().requires_grad_()
                  for p, v in zip(self.params, self.values, strict=True)}
        with torch.enable_grad(), product_kernels():
            with swapped_tensors(self.model, leaves, frozen_buffers=True):
                out = self.call(inputs)
            probe = torch.zeros_like(out, requires_grad=True)
            params = [leaves[id(p)] for p in self.params]
            transposed = torch.autograd.grad(
                out, params, probe, create_graph=True, allow_unused=True
            )
            used = [(g, i) for i, g in enumerate(transposed) if g is not None and g.requires_grad]
            products = []
            for tangent in tangents:  # t -> J t = ∂⟨Jᵀu, t⟩/∂u
                if not used:
                    products.append(torch.zeros_like(out))
                    continue
                (product,) = torch.autograd.grad(
                    [g for g, _ in used], probe, [tangent[i] for _, i in used],
                    retain_graph=True, allow_unused=True,
                )
                products.append(torch.zeros_like(out) if product is None else product.detach())
        return out.detach(), products

    def frozen_forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Outputs at the current parameters, without gradients, on copies of the buffers."""
        values = {id(p): v for p, v in zip(self.params, self.values, strict=True) if v is not p}
        with torch.no_grad(), swapped_tensors(self.model, values, frozen_buffers=True):
            return self.call(inputs)

    def per_sample_jacobian(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """Jₙ = ∂fₙ/∂θ for every sample, ``[N, K, P]`` (samples must not interact)."""
        params = self.detached_params()

        def single(params: tuple[Tensor, ...], *sample: Tensor) -> Tensor:
            out = self.outputs(params, tuple(x.unsqueeze(0) for x in sample))
            return out.squeeze(0).reshape(-1)

        with product_kernels():
            try:
                jac = torch.func.vmap(
                    torch.func.jacrev(single), in_dims=(None,) + (0,) * len(inputs)
                )(params, *inputs)
            except RuntimeError as error:  # an autograd.Function torch.func cannot transform
                if "functorch" not in str(error) and "setup_context" not in str(error):
                    raise
                return self._per_sample_jacobian_loop(inputs)
        return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac], dim=2)

    def _per_sample_jacobian_loop(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """:meth:`per_sample_jacobian` with plain autograd, one sample and one output
        entry at a time (slow; for models that ``torch.func`` cannot transform)."""
        rows = []
        for n in range(inputs[0].shape[0]):
            leaves = {id(p): v.detach().requires_grad_()
                      for p, v in zip(self.params, self.values, strict=True)}
            params = [leaves[id(p)] for p in self.params]
            with torch.enable_grad(), swapped_tensors(self.model, leaves, frozen_buffers=True):
                out = self.call(tuple(x[n : n + 1] for x in inputs)).reshape(-1)
                sample = []
                for k in range(out.numel()):
                    grads = torch.autograd.grad(out[k], params, retain_graph=True,
                                                allow_unused=True)
                    sample.append(torch.cat([
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(params, grads, strict=True)
                    ]))
            rows.append(torch.stack(sample))
        return torch.stack(rows)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat ``[P]`` vector into tensors shaped like the parameters."""
        return unflatten(vector, self.values)


@contextmanager
def product_kernels() -> Iterator[None]:
    """Inside natgrad's own products (Jacobian-vector products, per-sample Jacobians),
    ``F.scaled_dot_product_attention`` runs on PyTorch's math kernel: the fused ones (flash,
    memory-efficient, cuDNN, the CPU flash kernel) implement neither forward-mode AD nor
    ``vmap``, the math kernel is made of operations that do. The training forward is not
    affected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


# models whose forward has an operation without forward-mode AD: products go reverse-only
_REVERSE_ONLY: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def reverse_only(model: nn.Module) -> bool:
    """Whether ``model``'s Jacobian-vector products must avoid forward-mode AD."""
    return _REVERSE_ONLY.get(model, False)


def mark_reverse_only(model: nn.Module) -> None:
    """Record that ``model`` has an operation without forward-mode AD."""
    _REVERSE_ONLY[model] = True


# models whose forward calls something the stacked products do not take, with the reason
_UNSTACKED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def stacked_allowed(model: nn.Module) -> bool:
    """Whether ``model``'s products may try the stacked pass (it has not failed before)."""
    return model not in _UNSTACKED


def unstacked_reason(model: nn.Module) -> str | None:
    """Why ``model``'s products left the stacked pass (None: they did not)."""
    return _UNSTACKED.get(model)


def mark_unstacked(model: nn.Module, reason: str) -> None:
    """Record that ``model``'s forward calls something the stacked pass does not take."""
    _UNSTACKED[model] = reason


def _stacking_off() -> bool:
    """The caller's context rules the stacked pass out for this call only (not the model for
    good): autocast, a ``torch.func`` transform, forward-mode AD disabled."""
    return (torch._C._is_any_autocast_enabled() or torch._C._are_functorch_transforms_active()
            or not torch._C._is_fwd_grad_enabled())


def is_missing_forward_ad(error: Exception) -> bool:
    """Whether ``error`` says an operation has no forward-mode derivative."""
    text = str(error).lower()
    return any(key in text for key in ("forward ad", "forward-mode", "jvp", "forward mode"))


@contextmanager
def swapped_tensors(
    model: nn.Module, replacements: dict[int, Tensor], frozen_buffers: bool = False
) -> Iterator[None]:
    """Temporarily replace parameters (by ``id``) in every module that holds them, and
    optionally every buffer by a copy; everything is restored on exit."""
    swaps = []  # (table, name, original, replacement)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in replacements:
                swaps.append((module._parameters, name, p, replacements[id(p)]))
        if frozen_buffers:
            swaps += [
                (module._buffers, n, b, b.clone()) for n, b in module._buffers.items()
                if b is not None
            ]
    try:
        for table, name, _, replacement in swaps:
            table[name] = replacement
        yield
    finally:
        for table, name, original, _ in reversed(swaps):
            table[name] = original


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors, each flattened row-major, into one ``[P]`` vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat ``[P]`` vector into tensors shaped like ``like`` (row-major)."""
    chunks = vector.split([t.numel() for t in like])
    return [c.view_as(t) for c, t in zip(chunks, like, strict=True)]


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now (best effort)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30
