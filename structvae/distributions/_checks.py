"""Argument checks for the API boundary of the distributions.

The hot path (training) constructs distributions with ``validate_args=False``; the checks run when
``validate_args`` is true (torch's default) so that users calling the API directly get one clear
``ValueError`` naming the argument instead of a failure deep inside a linear-algebra kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values; check the network output feeding it")


def check_positive(name: str, value: Tensor | float) -> None:
    v = torch.as_tensor(value)
    if not bool((v > 0).all()):
        raise ValueError(f"{name} must be strictly positive (got min {v.min().item():.3g})")


def check_ndim(name: str, value: Tensor, ndim: int, layout: str) -> None:
    if value.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimensions {layout}, got shape {tuple(value.shape)}")


def check_size(name: str, value: Tensor, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {value.shape[dim]} in dimension {dim} but {meaning} is {expected} "
            f"(shape {tuple(value.shape)})"
        )


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for small dense linear algebra: half precisions are promoted to fp32, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_trailing_shape(name: str, value: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """``value.shape[-len(expected):]`` must equal ``expected`` (the event part of a parameter)."""
    k = len(expected)
    if value.dim() < k or tuple(value.shape[value.dim() - k :]) != tuple(expected):
        raise ValueError(f"{name} must end in {meaning} {tuple(expected)}, got shape {tuple(value.shape)}")


def check_broadcastable(name: str, shape: torch.Size, other_name: str, other_shape: torch.Size) -> torch.Size:
    """Broadcast two (batch) shapes, naming the offending argument when they are incompatible."""
    try:
        return torch.broadcast_shapes(shape, other_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(shape)}, which does not broadcast with {other_name} "
            f"of shape {tuple(other_shape)}"
        ) from None


def check_lower_cholesky(name: str, value: Tensor) -> None:
    """``value[..., n, n]`` must be lower-triangular with a strictly positive diagonal."""
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        raise ValueError(
            f"{name} must be a batch of square matrices [..., n, n], got shape {tuple(value.shape)}"
        )
    if bool((value.triu(1) != 0).any()):
        raise ValueError(f"{name} must be lower-triangular (found non-zero entries above the diagonal)")
    check_positive(f"diagonal of {name}", value.diagonal(dim1=-2, dim2=-1))
