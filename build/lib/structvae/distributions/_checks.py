"""The one home of the distributions' argument checks, shared constants and precision policy.

The hot path (training) constructs distributions with ``validate_args=False``; the checks run when
``validate_args`` is true (torch's default) so that users calling the API directly get one clear
``ValueError`` naming the argument instead of a failure deep inside a linear-algebra kernel.

Who checks what:

* every distribution declares its parameters' true ``arg_constraints`` (with torch's event dims) and
  its ``support``, and passes ``validate_args`` to ``Distribution.__init__``: torch's base class resolves
  ``None`` to its global default and enforces the constraints (``ValueError`` "Expected parameter <name>
  ... to satisfy the constraint ..."), and ``Distribution._validate_sample`` checks ``log_prob`` values
  against the support;
* the helpers here add only what torch cannot say: shape mismatches, checked always (they cost no
  device sync, and torch would fail later inside a kernel, or not at all for a broadcastable mistake),
  and, once ``structvae.private_api.validates(dist)`` says the instance validates, non-finite parameters
  (``constraints.real`` and ``positive`` admit +-inf, which would poison a Cholesky or a KL silently).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import Tensor

#: log(2 pi), the normal density's normaliser per dimension.
LOG_2PI = math.log(2.0 * math.pi)

_F = TypeVar("_F", bound=Callable)


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for reductions and small dense linear algebra: half precisions -> fp32, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Run the block in the tensors' own dtypes even inside ``torch.autocast``.

    Autocast would run matmuls in bf16/fp16 and lose 4 digits of e.g. a conditional mean; the
    distributions choose their compute dtype themselves (:func:`linalg_dtype`).
    """
    with torch.autocast(device_type, enabled=False):
        yield


def full_precision(method: _F) -> _F:
    """Decorator: run a distribution method under :func:`autocast_disabled` on its ``loc``'s device."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with autocast_disabled(self.loc.device.type):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` (any shape) holds NaN or inf."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values; check the network output feeding it")


def check_positive(name: str, value: Tensor | float) -> None:
    """Raise ``ValueError`` naming ``name`` unless every entry of ``value`` (any shape) is > 0."""
    v = torch.as_tensor(value)
    if not bool((v > 0).all()):
        raise ValueError(f"{name} must be strictly positive (got min {v.min().item():.3g})")


def check_ndim(name: str, value: Tensor, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``value.dim() >= ndim``; ``layout`` (e.g. ``"[*batch, N, n, p]"``) says why."""
    if value.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimensions {layout}, got shape {tuple(value.shape)}")


def check_trailing_shape(name: str, value: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """``value.shape[-len(expected):]`` must equal ``expected`` (the event part of a parameter)."""
    k = len(expected)
    if value.dim() < k or tuple(value.shape[value.dim() - k :]) != tuple(expected):
        raise ValueError(f"{name} must end in {meaning} {tuple(expected)}, got shape {tuple(value.shape)}")


def check_last_dim(name: str, value: object, size: int, layout: str) -> None:
    """``value`` must be a tensor of shape ``[..., size]``; ``layout`` names the size, e.g. ``"S=784"``."""
    if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[-1] != size:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must have shape [..., {layout}], got {shape}")


def check_broadcastable(name: str, shape: torch.Size, other_name: str, other_shape: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes(shape, other_shape)``, raising ``ValueError`` naming the offending argument."""
    try:
        return torch.broadcast_shapes(shape, other_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(shape)}, which does not broadcast with {other_name} "
            f"of shape {tuple(other_shape)}"
        ) from None


def check_flat_value(value: object, batch_shape: torch.Size, event_size: int) -> None:
    """A ``log_prob`` argument over flattened images: ``[*extra, *batch, S]`` broadcasting with the batch.

    Shape errors always raise, validating or not: they cost nothing (no device sync) and a wrongly
    shaped value would otherwise broadcast into a silently wrong result. The value check against the
    support (which needs a sync) is ``Distribution._validate_sample``, run by the caller when validating.
    """
    check_last_dim("value", value, event_size, f"S={event_size}")
    assert isinstance(value, Tensor)
    check_broadcastable("value's batch", value.shape[:-1], "batch_shape", batch_shape)


def check_finite_parameters(values: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first parameter (name -> tensor of any shape) holding NaN or inf.

    Run after ``Distribution.__init__`` has checked the declared constraints, when the instance validates:
    ``constraints.real`` and ``positive`` accept +-inf (NaN already failed torch's check, naming the
    parameter).
    """
    for name, value in values.items():
        check_finite(name, value)
