"""Elementwise merges: linear (model soup), NearSwap, passthrough."""

from __future__ import annotations

from typing import Optional

import torch

from . import native

Tensor = torch.Tensor


def linear(base: None, models: list[Tensor], *, weight: list[float], normalize: bool) -> Tensor:
    result = models[0] * weight[0]
    for tensor, w in zip(models[1:], weight[1:]):
        result.add_(tensor, alpha=w)
    if normalize:
        result.div_(sum(weight))
    return result


def linear_narrow(base: None, models: list[Tensor], out_dtype: torch.dtype, *, weight: list[float],
                  normalize: bool) -> Optional[Tensor]:
    """`linear` from bfloat16 chunks to a bfloat16 result, where the fused loops run."""
    if out_dtype != torch.bfloat16 or not native.fits(*models, dtype=torch.bfloat16):
        return None
    return native.linear_bf16(models, weight, normalize=normalize, divisor=sum(weight))


def nearswap(base: Tensor, models: list[Tensor], *, t: float) -> Tensor:
    other = models[0]
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


def passthrough(base: None, models: list[Tensor], *, scale: list[Optional[float]]) -> Tensor:
    return models[0] if scale[0] is None else models[0] * scale[0]


def expert_copy(base: None, models: list[Tensor], *, noise_scale: Optional[float], residual_scale: Optional[float],
                seed: int) -> Tensor:
    """An expert's tensor in a mixture of experts: with Gaussian noise added, then scaled, as mergekit-moe does."""
    tensor = models[0]
    if noise_scale is not None:
        noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed), dtype=tensor.dtype)
        tensor = tensor + noise.to(tensor.device) * noise_scale
    return tensor if residual_scale is None else tensor * residual_scale


def expert_copy_narrow(base: None, models: list[Tensor], out_dtype: torch.dtype, *, noise_scale: Optional[float],
                       residual_scale: Optional[float], seed: int) -> Optional[Tensor]:
    """A plain copy (no noise, no scale) converted straight to the output dtype, as mergekit-moe writes it."""
    if noise_scale is not None or residual_scale is not None:
        return None
    return models[0].to(out_dtype)
