"""Spherical interpolations: SLERP (streamed, its angle from one pass of fused row sums), NuSLERP,
Multi-SLERP and the Karcher mean."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import MergeError
from . import native
from .chunks import Chunks, FusedKernel, Kernel, WholeTensor, exact_total, row_sums

Tensor = torch.Tensor


def _slerp_coefficients(t: float, sq0: float, sq1: float, dot: float, dot_threshold: float = 0.9995,
                        eps: float = 1e-8) -> tuple[float, float]:
    """(a, b) with slerp(v0, v1) = a*v0 + b*v1, from |v0|^2, |v1|^2 and v0.v1 (linear when collinear)."""
    norm0, norm1 = math.sqrt(sq0), math.sqrt(sq1)
    norm0, norm1 = (norm0 if norm0 > eps else 1.0), (norm1 if norm1 > eps else 1.0)
    cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def prepare_slerp(chunks: Chunks, numel: int, *, t: float) -> Kernel:
    def dots(base: Tensor, models: list[Tensor], offset: int) -> tuple[list[float], list[float], list[float]]:
        """Row sums of base * base, model * model and base * model: the chunk's share of the norms
        and the dot product, the same whatever the chunking."""
        if native.takes(base, models[0]):
            return native.product_sums(base, models[0])
        v0, v1 = native.widened(base), native.widened(models[0])
        return row_sums(v0 * v0), row_sums(v1 * v1), row_sums(v0 * v1)

    parts = list(chunks.map(dots, as_loaded=True))
    sq0, sq1, dot = (exact_total(part[k] for part in parts) for k in range(3))
    a, b = _slerp_coefficients(t, sq0, sq1, dot)

    def narrow(base: Tensor, models: list[Tensor], offset: int, out_dtype: torch.dtype) -> Optional[Tensor]:
        if out_dtype != torch.bfloat16 or not native.fits(base, models[0], dtype=torch.bfloat16):
            return None
        return native.axpby_bf16(base, models[0], a, b)

    return FusedKernel(lambda base, models, offset: torch.mul(base, a).add_(models[0], alpha=b), narrow)


def slerp_pair(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation between two whole tensors."""
    return prepare_slerp(WholeTensor(v0, [v1]), v0.numel(), t=t)(v0, [v1], 0)


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    base: Optional[Tensor],
    models: list[Tensor],
    *,
    weight: list[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> Tensor:
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return _nuslerp_pair(t, models[0], models[1], nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp_pair(t, models[0] - base, models[1] - base, nuslerp_row_wise, nuslerp_flatten)


def multislerp(
    base: Optional[Tensor], models: list[Tensor], *, weight: list[float], normalize_weights: bool, eps: float
) -> Tensor:
    if len(models) == 1:
        return models[0]
    stacked = torch.stack(models)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(len(models), -1)
    weights = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeError("multislerp: the weighted inputs cancel out (opposite tensors); change the weights")
        result = (flat[0] * weights[0] + flat[1] * weights[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher(base: None, models: list[Tensor], *, max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Riemannian) mean of the inputs on the unit sphere, rescaled by their mean norm."""
    if len(models) == 1:
        return models[0]
    alphas = [1.0 / len(models)] * len(models)
    norms = [torch.linalg.vector_norm(m) for m in models]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(models[0])
    valid_alphas = [alphas[i] for i in valid]
    total = sum(valid_alphas)
    valid_alphas = [a / total for a in valid_alphas]
    units = [models[i] / norms[i] for i in valid]

    mean = sum(a * u for a, u in zip(valid_alphas, units))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(valid_alphas, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean
