"""Argument checks shared by natgrad's public functions and optimizers (one place, one wording).

Each raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) naming the argument and
what it may be.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "check_choice",
    "check_dtype",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive(name: str, value: Any, allow: Sequence[str] = ()) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (or one of ``allow``)."""
    if isinstance(value, str) and value in allow:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        extra = f" or one of {list(allow)}" if allow else ""
        raise ValueError(f"{name} must be a finite number > 0{extra}, got {value!r}")


def check_nonnegative(name: str, value: Any, upper: float | None = None) -> None:
    """Raise ValueError unless ``value`` is a finite number ≥ 0 (and < ``upper`` if given)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and value >= 0 and (upper is None or value < upper)
    if not ok:
        bound = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a number >= 0{bound}, got {value!r}")


def check_positive_int(name: str, value: Any, allow: Sequence[Any] = ()) -> None:
    """Raise ValueError unless ``value`` is an int ≥ 1 (or one of ``allow``, e.g. ``"auto"``)."""
    if any(value is a or (isinstance(a, str) and value == a) for a in allow):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = "".join(f", {a!r}" for a in allow)
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Raise ValueError unless ``value`` is one of ``allowed``; returns it as a plain str."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)


def check_dtype(name: str, value: Any) -> None:
    """Raise TypeError unless ``value`` is None or a floating torch.dtype."""
    if value is not None and value not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating torch.dtype or None, got {value!r}")


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """True if every entry of every tensor is finite (one device sync per dtype/device)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            groups.setdefault((t.dtype, t.device), []).append(t)
    # a norm is NaN or inf when some entry is (or, harmlessly, when it overflows)
    return all(
        bool(torch.stack(torch._foreach_norm(ts, 2)).isfinite().all())
        for ts in groups.values()
    )
