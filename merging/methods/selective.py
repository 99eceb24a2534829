"""Merges that weigh or select deltas by statistics of the whole tensor: Model Stock, SCE, Arcee
Fusion, RAM and RAM+."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .pruning import sign_consensus, top_k_mask

Tensor = torch.Tensor


def model_stock(base: Tensor, models: list[Tensor], *, filter_wise: bool) -> Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos_theta / torch.where(singular, 1.0, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def sce(base: Tensor, models: list[Tensor], *, select_topk: float, int8_mask: bool) -> Tensor:
    if not models:
        return base
    deltas = torch.stack([m - base for m in models])
    if select_topk < 1:
        deltas = deltas * _variance_top_k(deltas, select_topk)
    erase = sign_consensus(deltas)
    energy = deltas.square().reshape(len(models), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(models)) if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *([1] * base.dim())) * erase
    return base + (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _variance_top_k(deltas: Tensor, density: float) -> Tensor:
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    return top_k_mask(variance.abs(), k)


def arcee_fusion(base: Tensor, models: list[Tensor], *, seed: int) -> Tensor:
    other = models[0]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    generator = torch.Generator(device=importance.device)
    generator.manual_seed(seed)
    q1, median, q3 = _approximate_quantiles(importance, (0.25, 0.5, 0.75), generator)
    mask = importance >= median + 1.5 * (q3 - q1)
    return base + (other - base) * mask


_QUANTILE_SAMPLE = 1_000_000


def _approximate_quantiles(values: Tensor, qs: Sequence[float], generator: torch.Generator) -> list[Tensor]:
    flat = values.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    return [ordered[int(q * (ordered.numel() - 1))] for q in qs]


def _ram_masks(base: Tensor, models: list[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    deltas = torch.stack([m - base for m in models]).reshape(len(models), -1)
    nonzero = deltas.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return deltas * nonzero, nonzero, counts, counts > 1, counts == 1


def ram(base: Tensor, models: list[Tensor], *, epsilon: float) -> Tensor:
    if not models:
        return base
    deltas, _, counts, overlap, unique = _ram_masks(base, models, epsilon)
    merged = (deltas * unique + deltas * overlap / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ramplus_tl(base: Tensor, models: list[Tensor], *, r: float, alpha: float, epsilon: float) -> Tensor:
    if not models:
        return base
    deltas, nonzero, counts, overlap, unique = _ram_masks(base, models, epsilon)
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    boost = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (deltas * unique * boost + deltas * overlap / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)
