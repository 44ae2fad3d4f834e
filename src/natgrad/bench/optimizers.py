"""The benchmark's optimizers: one registry of name → factory, grid, defaults.

Adding an optimizer is one :class:`OptimizerSpec` entry in :data:`OPTIMIZERS`. Its
hyper-parameters for a problem come from the tuned-values file (``tuned.json`` beside this
module, written by ``natgrad bench --tune``) and fall back to the entry's ``defaults``
(an empty dict means the optimizer's own defaults) until it has been tuned.

Grids (each value tried with the same step budget, see ``natgrad bench --tune``):

* ``sgd``: lr ∈ {1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10}, momentum 0.9 (heavy ball).
* ``adam``: lr ∈ {3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1}.
* ``adadelta``: lr ∈ {0.3, 1, 3, 10, 30}.
* ``muon``: lr ∈ {1e-3, 3e-3, 1e-2, 3e-2, 0.1} (torch.optim.Muon on the hidden weight
  matrices at AdamW's update RMS, AdamW on the rest; :mod:`natgrad.bench.peers`).
* ``soap``, ``shampoo`` (KL-Shampoo), ``psgd-kron``: HeavyBall's, lr grids of five values;
  only with the ``peers`` extra installed (``pip install 'natgrad[peers]'``), else the
  bench names them as not installed and runs without them.
* ``ngd``: lr ∈ {0.1, 0.3, 1} × damping ∈ {1e-3, 1e-2, 0.1} × momentum ∈ {0, 0.9}.
* ``kfac``, ``ekfac``, ``ngdcg``: natgrad's defaults (automatic lr, momentum and damping),
  named as users call them; nothing to tune.
* ``kfac-fixed``, ``ekfac-fixed``: fixed lr ∈ {0.03, 0.1, 0.3} × damping ∈ {1e-3, 1e-2, 0.1},
  momentum 0.9, KL clipping 1e-2 (statistics every 5 steps, inverses every 10, as the
  defaults).

Exact natural gradient (``ngd``) forms the Fisher's rows, an (N·R)×P matrix for a batch of N
examples with R outputs each and P parameters, and solves with it (O((N·R)²·P) work). It
runs only where N·R·P ≤ :data:`NGD_MAX_JACOBIAN` (2·10⁶), at the problem's own batch size:
that admits ``regression`` (64·1·4,929 ≈ 3·10⁵, ~11 ms a step) and excludes the digits
problems (``digits-cnn``: 128·10·9,930 ≈ 1.3·10⁷, ``digits-mlp``: 256·10·26,122 ≈ 6.7·10⁷,
which would take seconds a step).

Matrix-free natural gradient (``ngdcg``) costs 30-40 Adam steps a step (up to 10 CG
iterations, each a forward-mode and a reverse-mode pass), so it runs a tenth
(:data:`NGDCG_STEP_FRACTION`) of each step budget, evaluated ten times as often: its steps and
seconds to target compare directly with the others'; its final loss is the loss after its
shorter budget (``steps`` in ``results.json`` says how many steps each run took).

The natgrad entries are looked up on the ``natgrad`` package when they are built, so an
entry whose class natgrad does not export yet is reported as unavailable, not an error.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "NGD_MAX_JACOBIAN",
    "OPTIMIZERS",
    "REFERENCE",
    "OptimizerSpec",
    "available_optimizers",
    "load_tuned",
    "save_tuned",
]

Hyper = dict[str, float | str]  # str for modes such as lr="auto"
Factory = Callable[[nn.Module, str, Hyper], Optimizer]

REFERENCE = "adam"  # defines each problem's target loss; always run
NGD_MAX_JACOBIAN = 2e6
NGDCG_STEP_FRACTION = 0.1
TUNED_FILE = "tuned.json"
SOURCE_KEY = "source"  # added by load_tuned: the file read (None: no file, registry defaults)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the benchmark.

    Attributes:
        name: registry key used by ``--optimizers``.
        description: one line for ``--help``.
        build: (model, the problem's torch loss module, hyper-parameters) → optimizer.
        grid: hyper-parameter name → values tried by ``--tune`` (the Cartesian product).
        defaults: hyper-parameters used where no tuned value exists.
        natgrad_name: the class on the ``natgrad`` package this entry needs, if any.
        max_jacobian: largest batch·outputs·parameters the optimizer is run on (None: all).
        requires: the package the optimizer comes from, if it is not torch or natgrad (an
            optional extra; the entry is unavailable without it).
        step_fraction: share of each problem's step budget (and of the steps between
            evaluations) the optimizer runs, for optimizers whose step costs tens of Adam
            steps; 1.0 for all others.
    """

    name: str
    description: str
    build: Factory
    grid: Mapping[str, tuple[float | str, ...]]
    defaults: Hyper = field(default_factory=dict)
    natgrad_name: str | None = None
    max_jacobian: float | None = None
    step_fraction: float = 1.0
    requires: str | None = None

    @property
    def available(self) -> bool:
        """Whether this install provides the optimizer (natgrad's class, the package)."""
        if self.requires is not None:
            return importlib.util.find_spec(self.requires) is not None
        if self.natgrad_name is None:
            return True
        import natgrad

        return hasattr(natgrad, self.natgrad_name)

    def configs(self) -> list[Hyper]:
        """Every point of the grid, in a fixed order."""
        names = list(self.grid)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(
            *(self.grid[name] for name in names)
        )]

    def skip_reason(self, num_params: int, batch_size: int, outputs: int) -> str | None:
        """Why the optimizer is not run on a problem of this size, or None if it is."""
        size = num_params * batch_size * outputs
        if self.max_jacobian is not None and size > self.max_jacobian:
            return (
                f"batch*outputs*params = {batch_size}*{outputs}*{num_params} = {size:.2g} "
                f"exceeds {self.max_jacobian:.2g}"
            )
        return None

    def budget(self, steps: int, eval_every: int) -> tuple[int, int]:
        """(steps, steps between evaluations) of this optimizer for a problem's budget."""
        if self.step_fraction == 1.0:
            return steps, eval_every
        return (max(1, round(steps * self.step_fraction)),
                max(1, round(eval_every * self.step_fraction)))

    def hparams(self, problem: str, tuned: Mapping[str, Any]) -> Hyper:
        """The tuned hyper-parameters for ``problem``, else :attr:`defaults`."""
        values = tuned.get("values", {}).get(problem, {}).get(self.name)
        return dict(values) if values is not None else dict(self.defaults)


def _torch(cls: type[Optimizer]) -> Factory:
    def build(model: nn.Module, loss: nn.Module, hparams: Hyper) -> Optimizer:
        return cls(model.parameters(), **hparams)

    return build


def _muon(model: nn.Module, loss: nn.Module, hparams: Hyper) -> Any:
    from natgrad.bench.peers import muon

    return muon(model, **hparams)


def _heavyball(class_name: str) -> Factory:
    def build(model: nn.Module, loss: nn.Module, hparams: Hyper) -> Optimizer:
        import heavyball

        # eager steps: HeavyBall compiles its steps with max-autotune by default, which on a
        # CPU costs seconds per new shape (and failed for PSGDKron on torch 2.13)
        heavyball.utils.compile_mode = None
        # no weight decay: the benchmark compares training losses
        return getattr(heavyball, class_name)(model.parameters(), weight_decay=0.0,
                                              compile_step=False, **hparams)

    return build


def _natgrad(class_name: str) -> Factory:
    def build(model: nn.Module, loss: nn.Module, hparams: Hyper) -> Optimizer:
        import natgrad

        return getattr(natgrad, class_name)(model, loss=loss, **hparams)

    return build


_FIXED_CURVATURE_GRID = {
    "lr": (0.03, 0.1, 0.3), "damping": (1e-3, 1e-2, 0.1), "momentum": (0.9,), "kl_clip": (1e-2,),
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            name="sgd",
            description="torch.optim.SGD with heavy-ball momentum 0.9",
            build=_torch(torch.optim.SGD),
            grid={"lr": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0), "momentum": (0.9,)},
            defaults={"lr": 0.01, "momentum": 0.9},
        ),
        OptimizerSpec(
            name="adam",
            description="torch.optim.Adam (its target loss defines every problem's target)",
            build=_torch(torch.optim.Adam),
            grid={"lr": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)},
            defaults={"lr": 1e-3},
        ),
        OptimizerSpec(
            name="adadelta",
            description="torch.optim.Adadelta",
            build=_torch(torch.optim.Adadelta),
            grid={"lr": (0.3, 1.0, 3.0, 10.0, 30.0)},
            defaults={"lr": 1.0},
        ),
        OptimizerSpec(
            name="muon",
            description="torch.optim.Muon on the hidden weight matrices, AdamW on the rest",
            build=_muon,
            grid={"lr": (1e-3, 3e-3, 1e-2, 3e-2, 0.1)},
            defaults={"lr": 0.02},
        ),
        OptimizerSpec(
            name="soap",
            description="SOAP (HeavyBall): Adam in Shampoo's eigenbasis",
            build=_heavyball("SOAP"),
            grid={"lr": (1e-3, 3e-3, 1e-2, 3e-2, 0.1)},
            defaults={"lr": 3e-3},
            requires="heavyball",
        ),
        OptimizerSpec(
            name="shampoo",
            description="Shampoo (HeavyBall's KLShampoo)",
            build=_heavyball("KLShampoo"),
            grid={"lr": (1e-3, 3e-3, 1e-2, 3e-2, 0.1)},
            defaults={"lr": 3e-3},
            requires="heavyball",
        ),
        OptimizerSpec(
            name="psgd-kron",
            description="PSGD with Kronecker preconditioners (HeavyBall's PSGDKron)",
            build=_heavyball("PSGDKron"),
            grid={"lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
            defaults={"lr": 1e-3},
            requires="heavyball",
        ),
        OptimizerSpec(
            name="ngd",
            description="natgrad.NaturalGradient: exact Fisher (small models only)",
            build=_natgrad("NaturalGradient"),
            grid={
                "lr": (0.03, 0.1, 0.3, 1.0),
                "damping": (1e-4, 1e-3, 1e-2, 1e-1),
                "momentum": (0.0, 0.9),
            },
            defaults={"lr": 0.3, "damping": 1e-2, "momentum": 0.0},
            natgrad_name="NaturalGradient",
            max_jacobian=NGD_MAX_JACOBIAN,
        ),
        OptimizerSpec(
            name="kfac",
            description="natgrad.KFAC defaults: automatic lr, momentum and damping",
            build=_natgrad("KFAC"),
            grid={},
            natgrad_name="KFAC",
        ),
        OptimizerSpec(
            name="kfac-fixed",
            description="natgrad.KFAC with a tuned fixed lr and damping, KL clipping",
            build=_natgrad("KFAC"),
            grid=_FIXED_CURVATURE_GRID,
            defaults={"lr": 0.1, "damping": 1e-2, "momentum": 0.9, "kl_clip": 1e-2},
            natgrad_name="KFAC",
        ),
        OptimizerSpec(
            name="ekfac",
            description="natgrad.EKFAC defaults: automatic lr, momentum and damping",
            build=_natgrad("EKFAC"),
            grid={},
            natgrad_name="EKFAC",
        ),
        OptimizerSpec(
            name="ekfac-fixed",
            description="natgrad.EKFAC with a tuned fixed lr and damping, KL clipping",
            build=_natgrad("EKFAC"),
            grid=_FIXED_CURVATURE_GRID,
            defaults={"lr": 0.1, "damping": 1e-2, "momentum": 0.9, "kl_clip": 1e-2},
            natgrad_name="EKFAC",
        ),
        OptimizerSpec(
            name="ngdcg",
            description="natgrad.NGDCG defaults: matrix-free natural gradient by CG, automatic",
            build=_natgrad("NGDCG"),
            grid={},
            natgrad_name="NGDCG",
            step_fraction=NGDCG_STEP_FRACTION,
        ),
    )
}


def available_optimizers() -> list[str]:
    """Names of the registry's optimizers that this install provides, in registry order."""
    return [name for name, spec in OPTIMIZERS.items() if spec.available]


def load_tuned(path: str | Path | None = None) -> dict[str, Any]:
    """The tuned-values file: ``{"values": {problem: {optimizer: {name: value}}}, ...}``.

    Args:
        path: a file written by ``natgrad bench --tune``; None reads the one shipped with
            natgrad (``natgrad/bench/tuned.json``), or nothing if it is missing.

    Returns:
        The file's object plus ``"source"``: the path read, or None where no file was found
        (every optimizer then runs with its registry ``defaults``).

    Raises:
        ValueError: if the file cannot be read or is not such a JSON object.
    """
    try:
        if path is None:
            resource = resources.files("natgrad.bench").joinpath(TUNED_FILE)
            if not resource.is_file():  # e.g. a wheel built without package data
                return {"values": {}, SOURCE_KEY: None}
            text, source = resource.read_text(encoding="utf-8"), str(resource)
        else:
            text, source = Path(path).read_text(encoding="utf-8"), str(path)
        tuned = json.loads(text)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read tuned values from {path}: {err}") from err
    if not isinstance(tuned, dict) or not isinstance(tuned.get("values", {}), dict):
        raise ValueError(f"tuned values in {path} must be a JSON object with a 'values' object")
    tuned.setdefault("values", {})
    tuned[SOURCE_KEY] = source
    return tuned


def save_tuned(tuned: Mapping[str, Any], path: str | Path) -> Path:
    """Write tuned values as indented JSON (the format :func:`load_tuned` reads)."""
    path = Path(path)
    tuned = {key: value for key, value in tuned.items() if key != SOURCE_KEY}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tuned, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
